"""Compressed context store: a narrow interface over tiers RAM LRU -> disk -> Redis.

An entry is a compressed cache (``CompressedCache.state_dict()`` tensors) plus a JSON manifest
holding the key, the token ids it was computed from, the cache metadata and the sha256 of the
tensor payload. Every tier checks what it reads: a payload whose checksum, manifest or tensors do
not match is logged, removed from that tier and reported as ``corrupt`` (the caller recomputes it
from the token ids, which the manifest keeps), never returned as a cache.

- ``MemoryTier``: an LRU of entries under a byte cap (tensors kept as tensors, cloned on read).
- ``DiskTier``: ``<dir>/<digest>.safetensors`` + ``<digest>.json``; each written to a temporary
  file, fsynced and renamed into place, payload first, so a manifest only ever names a complete
  payload and a crash leaves no half-written entry behind. Survives restarts.
- ``RedisTier``: one hash per entry (``manifest`` and ``payload`` fields set in one ``HSET``, so a
  reader never sees one without the other), shared by every replica pointing at the same server.

``TieredStore.get`` reads tiers in order and copies a hit into the faster tiers; ``put`` writes
through to every tier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

log = logging.getLogger("kvsqueeze.serve.store")

# version of the entry layout (manifest fields, state_dict tensors); part of every key, so entries
# written by another version are misses, never misread
FORMAT = 2


@dataclass(frozen=True)
class ContextKey:
    """What a stored cache depends on; ``scope`` separates API keys (``"public"`` without one).

    ``chunk_size`` is the prefill chunk the cache was compressed at (chunked recipes keep other
    tokens at another chunk size), ``head_profile`` a digest of the head profile the recipe read
    (``"none"``), ``format`` the entry layout's version.
    """

    model: str
    recipe: str
    dtype: str
    content_hash: str
    scope: str = "public"
    chunk_size: int = 0
    head_profile: str = "none"
    format: int = FORMAT

    def digest(self) -> str:
        """A file- and key-safe name for this key (sha256 of its fields)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class Entry:
    """A stored cache: ``tensors`` (None when only the manifest survived) and JSON ``meta``.

    ``meta`` holds at least ``"tokens"`` (the token ids the cache was computed from) and
    ``"cache"`` (the metadata of ``CompressedCache.state_dict``).
    """

    tensors: dict[str, torch.Tensor] | None
    meta: dict
    nbytes: int = 0

    def __post_init__(self) -> None:
        if self.tensors is not None and not self.nbytes:
            self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())

    def clone(self) -> Entry:
        tensors = None if self.tensors is None else {k: v.clone() for k, v in self.tensors.items()}
        return Entry(tensors, json.loads(json.dumps(self.meta)), self.nbytes)


class CorruptEntryError(ValueError):
    """A stored entry failed its checks (checksum, manifest, tensors); ``meta`` is the manifest's
    metadata when the manifest itself was sound (kept out of the message: it holds token ids)."""

    def __init__(self, message: str, meta: dict | None = None):
        super().__init__(message)
        self.meta = meta


class Tier(Protocol):
    name: str

    def contains(self, key: ContextKey) -> bool: ...
    def put(self, key: ContextKey, entry: Entry) -> None: ...
    def get(self, key: ContextKey) -> Entry | None: ...
    def remove(self, key: ContextKey) -> None: ...
    def close(self) -> None: ...


def encode(key: ContextKey, entry: Entry) -> tuple[bytes, bytes]:
    """(manifest JSON, safetensors payload) of an entry with tensors."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in entry.tensors.items()}
    payload = save_tensors(tensors)
    manifest = {
        "format": key.format,
        "key": asdict(key),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
        "meta": entry.meta,
    }
    return json.dumps(manifest, sort_keys=True).encode(), payload


def decode_manifest(key: ContextKey, raw: bytes) -> dict:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptEntryError(f"manifest is not JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != key.format:
        raise CorruptEntryError("manifest has an unknown format")
    if manifest.get("key") != asdict(key):
        raise CorruptEntryError(f"manifest is for another key: {manifest.get('key')}")
    if not isinstance(manifest.get("meta", {}).get("tokens"), list):
        raise CorruptEntryError("manifest has no token ids")
    return manifest


def decode_payload(manifest: dict, payload: bytes | None) -> dict[str, torch.Tensor]:
    if payload is None:
        raise CorruptEntryError("payload is missing")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.get("sha256") or len(payload) != manifest.get("payload_bytes"):
        raise CorruptEntryError(
            f"payload checksum {digest[:12]} != manifest {str(manifest.get('sha256'))[:12]}"
        )
    try:
        return load_tensors(payload)
    except Exception as error:  # safetensors raises its own error types
        raise CorruptEntryError(f"payload does not parse: {error}") from None


class MemoryTier:
    """In-process LRU of entries, evicting the least recently used past ``max_bytes``."""

    name = "ram"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()  # the server reads and writes from several threads

    def contains(self, key: ContextKey) -> bool:
        return key.digest() in self.entries

    def put(self, key: ContextKey, entry: Entry) -> None:
        if entry.tensors is None or entry.nbytes > self.max_bytes:
            return
        copy = entry.clone()
        with self._lock:
            self._pop(key.digest())
            self.entries[key.digest()] = copy
            self.nbytes += copy.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.nbytes -= evicted.nbytes

    def get(self, key: ContextKey) -> Entry | None:
        with self._lock:
            entry = self.entries.get(key.digest())
            if entry is None:
                return None
            self.entries.move_to_end(key.digest())
        return entry.clone()

    def remove(self, key: ContextKey) -> None:
        with self._lock:
            self._pop(key.digest())

    def _pop(self, digest: str) -> None:
        entry = self.entries.pop(digest, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def close(self) -> None:
        with self._lock:
            self.entries.clear()
            self.nbytes = 0


class DiskTier:
    """Entries as safetensors + JSON manifest files under one directory (see module docstring)."""

    name = "disk"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def paths(self, key: ContextKey) -> tuple[Path, Path]:
        digest = key.digest()
        return self.directory / f"{digest}.json", self.directory / f"{digest}.safetensors"

    def contains(self, key: ContextKey) -> bool:
        return self.paths(key)[0].exists()

    def put(self, key: ContextKey, entry: Entry) -> None:
        manifest, payload = encode(key, entry)
        manifest_path, payload_path = self.paths(key)
        _write_atomically(payload_path, payload)
        _write_atomically(manifest_path, manifest)

    def get(self, key: ContextKey) -> Entry | None:
        manifest_path, payload_path = self.paths(key)
        try:
            raw = manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        manifest = decode_manifest(key, raw)
        try:
            payload = payload_path.read_bytes()
        except FileNotFoundError:
            payload = None
        try:
            tensors = decode_payload(manifest, payload)
        except CorruptEntryError as error:
            raise CorruptEntryError(str(error), manifest["meta"]) from None
        return Entry(tensors, manifest["meta"])

    def remove(self, key: ContextKey) -> None:
        for path in self.paths(key):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        pass


class RedisTier:
    """Entries as Redis hashes ``kvsqueeze:ctx:<digest>`` with ``manifest`` and ``payload`` fields."""

    name = "redis"
    PREFIX = "kvsqueeze:ctx:"

    def __init__(self, url: str, ttl_seconds: int | None = None):
        import redis

        self.url = url
        self.ttl_seconds = ttl_seconds
        self.client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)

    def _name(self, key: ContextKey) -> str:
        return self.PREFIX + key.digest()

    def contains(self, key: ContextKey) -> bool:
        return bool(self.client.exists(self._name(key)))

    def put(self, key: ContextKey, entry: Entry) -> None:
        manifest, payload = encode(key, entry)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._name(key), mapping={"manifest": manifest, "payload": payload})
        if self.ttl_seconds:
            pipe.expire(self._name(key), self.ttl_seconds)
        else:
            pipe.persist(self._name(key))  # HSET keeps an earlier writer's expiry
        pipe.execute()

    def get(self, key: ContextKey) -> Entry | None:
        raw, payload = self.client.hmget(self._name(key), ["manifest", "payload"])
        if raw is None:
            return None
        if self.ttl_seconds:  # an entry in use stays
            self.client.expire(self._name(key), self.ttl_seconds)
        manifest = decode_manifest(key, raw)
        try:
            tensors = decode_payload(manifest, payload)
        except CorruptEntryError as error:
            raise CorruptEntryError(str(error), manifest["meta"]) from None
        return Entry(tensors, manifest["meta"])

    def remove(self, key: ContextKey) -> None:
        self.client.delete(self._name(key))

    def close(self) -> None:
        self.client.close()


@dataclass
class Lookup:
    """What ``TieredStore.get`` found: an entry with tensors (``tier`` names where), or only the
    manifest's metadata of a corrupt entry (``entry.tensors is None``, ``corrupt`` True), or nothing."""

    entry: Entry | None = None
    tier: str | None = None
    corrupt: bool = False
    errors: list[str] = field(default_factory=list)


class TieredStore:
    """RAM LRU -> disk -> Redis behind contains / put / get / remove / close.

    A tier that fails (Redis down, disk full) is logged and skipped: the store degrades to a miss,
    it never raises into the server.
    """

    def __init__(self, tiers: list[Tier]):
        self.tiers = tiers

    @classmethod
    def from_specs(cls, ram_bytes: int, specs: list[str], redis_ttl: float = 0) -> TieredStore:
        """``specs``: directories and ``redis://host:port[/db]`` URLs, in the order given;
        ``redis_ttl`` seconds is the expiry of Redis entries (0 = never)."""
        tiers: list[Tier] = [MemoryTier(ram_bytes)]
        for spec in specs:
            redis = spec.startswith(("redis://", "rediss://"))
            tiers.append(RedisTier(spec, math.ceil(redis_ttl) or None) if redis else DiskTier(spec))
        return cls(tiers)

    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.tiers]

    def contains(self, key: ContextKey) -> bool:
        return any(self._safely(tier, "contains", tier.contains, key) for tier in self.tiers)

    def put(self, key: ContextKey, entry: Entry) -> None:
        for tier in self.tiers:
            self._safely(tier, "put", tier.put, key, entry)

    def get(self, key: ContextKey) -> Lookup:
        lookup = Lookup()
        for index, tier in enumerate(self.tiers):
            try:
                entry = tier.get(key)
            except CorruptEntryError as error:
                log.warning(
                    "corrupt context entry in %s tier (%s): %s; removed", tier.name, key.digest(), error
                )
                lookup.corrupt = True
                lookup.errors.append(f"{tier.name}: {error}")
                if error.meta is not None and lookup.entry is None:
                    lookup.entry = Entry(None, error.meta)
                self._safely(tier, "remove", tier.remove, key)
                continue
            except Exception as error:
                log.warning("context store tier %s failed on get: %s", tier.name, error)
                continue
            if entry is None:
                continue
            for faster in self.tiers[:index]:
                self._safely(faster, "put", faster.put, key, entry)
            return Lookup(entry, tier.name, lookup.corrupt, lookup.errors)
        return lookup

    def remove(self, key: ContextKey) -> None:
        for tier in self.tiers:
            self._safely(tier, "remove", tier.remove, key)

    def close(self) -> None:
        for tier in self.tiers:
            self._safely(tier, "close", tier.close)

    @staticmethod
    def _safely(tier: Tier, what: str, method, *args):
        try:
            return method(*args)
        except Exception as error:
            log.warning("context store tier %s failed on %s: %s", tier.name, what, error)
            return None


def _write_atomically(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
