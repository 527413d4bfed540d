"""Prefix reuse: cache states at chunk-aligned token-block boundaries, found by a hash chain.

The context part of a request is prefilled in chunks of ``chunk_size`` tokens aligned at
position 0, and the recipe compresses after every chunk. The cache after chunk ``k`` therefore
depends only on the first ``k * chunk_size`` tokens (and the model, recipe, dtype, chunk size),
compressed or not, so it can be saved under the hash chain of those token blocks and resumed by
any later request whose context starts with the same blocks. The state at the end of a context
(after its partial last chunk) is saved too, under the chain with that partial block: only a
request with the very same context finds it, which is what a repeated prompt or another question
on the same document is (the question lies in the protected tail, outside the context; see
``kvsqueeze.serve.prompts``). Not reused: anything after the first differing token, and the
prompt tail (never compressed, usually the part that differs).

Only some boundaries are saved, since each snapshot is a whole cache (compressed caches cannot
share blocks: a later chunk may evict tokens of an earlier one): chunk counts that are powers of
two, the last full chunk and the end of each context. States live in a byte-capped in-RAM LRU,
scoped per API key.
"""

from __future__ import annotations

import hashlib

import torch

from kvsqueeze.cache import CompressedCache
from kvsqueeze.serve.store import ContextKey, Entry, MemoryTier


def chain_hashes(tokens: list[int], chunk_size: int) -> list[str]:
    """``h[k]`` = hash of the first ``min((k + 1) * chunk_size, len(tokens))`` tokens, chained
    block by block (the last block is partial unless the length is a chunk multiple)."""
    hashes, previous = [], b""
    for start in range(0, len(tokens), chunk_size):
        block = torch.tensor(tokens[start : start + chunk_size], dtype=torch.int64).numpy().tobytes()
        previous = hashlib.sha256(previous + block).digest()
        hashes.append(previous.hex())
    return hashes


def worth_saving(stop: int, chunk_size: int, context_length: int) -> bool:
    """Save the state after the first ``stop`` tokens of a context? At its end, and at the
    chunk boundaries after a power-of-two number of chunks or after its last full chunk."""
    chunks, partial = divmod(stop, chunk_size)
    if stop == context_length:
        return True
    return not partial and (chunks == context_length // chunk_size or chunks & (chunks - 1) == 0)


class PrefixCache:
    """Cache states at chunk boundaries, keyed by (model, recipe, dtype, chunk size, hash, scope)."""

    def __init__(self, max_bytes: int, chunk_size: int, model: str, recipe: str, dtype: str):
        self.chunk_size = chunk_size
        self.base = (model, recipe, dtype)
        self.tier = MemoryTier(max_bytes)
        self.hits = 0
        self.hit_tokens = 0

    def _key(self, chain_hash: str, scope: str) -> ContextKey:
        return ContextKey(*self.base, content_hash=chain_hash, scope=scope, chunk_size=self.chunk_size)

    def lookup(self, context: list[int], scope: str) -> tuple[int, CompressedCache] | None:
        """The longest saved prefix of ``context``: (tokens it covers, a private copy of its cache)."""
        hashes = chain_hashes(context, self.chunk_size)
        for blocks in range(len(hashes), 0, -1):
            entry = self.tier.get(self._key(hashes[blocks - 1], scope))
            if entry is not None:
                tokens = min(blocks * self.chunk_size, len(context))
                self.hits += 1
                self.hit_tokens += tokens
                return tokens, CompressedCache.from_state_dict(entry.tensors, entry.meta["cache"])
        return None

    def save(self, context: list[int], tokens: int, cache: CompressedCache, scope: str) -> None:
        """Save ``cache``, the state after the first ``tokens`` of ``context`` (a chunk multiple,
        or the whole context)."""
        chain_hash = chain_hashes(context[:tokens], self.chunk_size)[-1]
        key = self._key(chain_hash, scope)
        if self.tier.contains(key):
            return
        tensors, meta = cache.state_dict()
        self.tier.put(key, Entry(tensors, {"tokens": [], "cache": meta}))

    @property
    def nbytes(self) -> int:
        return self.tier.nbytes
