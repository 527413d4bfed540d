"""The context store: RAM LRU, disk (restart), Redis (shared), corruption detected, never served."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from test_serve_helpers import redis_server
from tiny_models import padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import prefill
from kvsqueeze.recipe import Recipe
from kvsqueeze.serve.app import profile_digest
from kvsqueeze.serve.local import free_port
from kvsqueeze.serve.store import FORMAT, ContextKey, DiskTier, Entry, MemoryTier, RedisTier, TieredStore

KEY = ContextKey("tiny", "knorm@0.5", "float32", "abc123", "public")


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def entry():
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([30], seed=3)
    cache = CompressedCache(Recipe.parse("knorm@0.5"))
    with torch.no_grad():
        prefill(model, cache, ids, mask, chunk_size=8)
    tensors, meta = cache.state_dict()
    return Entry({k: v.clone() for k, v in tensors.items()}, {"tokens": ids[0].tolist(), "cache": meta})


def same(a: Entry, b: Entry) -> None:
    assert a.meta == b.meta
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], atol=0, rtol=0)
    cache = CompressedCache.from_state_dict(b.tensors, b.meta["cache"])
    assert cache.nbytes() == a.nbytes


def test_memory_tier_is_an_lru_under_a_byte_cap(entry):
    tier = MemoryTier(max_bytes=int(entry.nbytes * 2.5))
    keys = [ContextKey("tiny", "r", "f", str(i)) for i in range(3)]
    for key in keys:
        tier.put(key, entry)
    assert not tier.contains(keys[0]) and tier.contains(keys[1]) and tier.contains(keys[2])
    got = tier.get(keys[1])
    same(entry, got)
    got.tensors["0.dense.token.keys"].zero_()  # a reader's copy is private
    same(entry, tier.get(keys[1]))


def test_disk_survives_a_restart_and_writes_atomically(tmp_path, entry):
    TieredStore([MemoryTier(1 << 30), DiskTier(tmp_path)]).put(KEY, entry)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]  # no temp files left
    restarted = TieredStore([MemoryTier(1 << 30), DiskTier(tmp_path)])
    lookup = restarted.get(KEY)
    assert lookup.tier == "disk" and not lookup.corrupt
    same(entry, lookup.entry)
    assert restarted.get(KEY).tier == "ram"  # promoted
    other_scope = ContextKey(KEY.model, KEY.recipe, KEY.dtype, KEY.content_hash, "someone-else")
    assert restarted.get(other_scope).entry is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_disk_payload_is_detected_and_never_served(tmp_path, entry, caplog, damage):
    DiskTier(tmp_path).put(KEY, entry)
    payload = next(tmp_path.glob("*.safetensors"))
    data = bytearray(payload.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        payload.write_bytes(bytes(data))
    elif damage == "truncate":
        payload.write_bytes(bytes(data[:100]))
    else:
        payload.unlink()
    with caplog.at_level(logging.WARNING, logger="kvsqueeze.serve.store"):
        lookup = TieredStore([MemoryTier(1 << 30), DiskTier(tmp_path)]).get(KEY)
    assert lookup.corrupt and lookup.entry.tensors is None
    assert lookup.entry.meta["tokens"] == entry.meta["tokens"]  # enough to recompute it
    assert "corrupt context entry" in caplog.text and KEY.digest() in caplog.text
    tokens = entry.meta["tokens"]
    assert str(tokens[:4])[1:-1] not in caplog.text  # the document's token ids are not logged
    assert list(tmp_path.iterdir()) == []  # removed


def test_a_manifest_for_another_key_is_rejected(tmp_path, entry):
    tier = DiskTier(tmp_path)
    tier.put(KEY, entry)
    other = ContextKey("tiny", "knorm@0.5", "float32", "other")
    manifest, _ = tier.paths(KEY)
    manifest.rename(tier.paths(other)[0])
    lookup = TieredStore([tier]).get(other)
    assert lookup.corrupt and lookup.entry is None


def test_redis_is_shared_by_two_stores(redis_url, entry):
    first = TieredStore.from_specs(1 << 30, [redis_url])
    second = TieredStore.from_specs(1 << 30, [redis_url])
    key = ContextKey("tiny", "knorm@0.5", "float32", "shared")
    first.put(key, entry)
    lookup = second.get(key)
    assert lookup.tier == "redis"
    same(entry, lookup.entry)
    assert second.get(key).tier == "ram"
    first.remove(key)
    assert not RedisTier(redis_url).contains(key)
    first.close()
    second.close()


def test_corrupt_redis_payload_is_detected(redis_url, entry):
    tier = RedisTier(redis_url)
    key = ContextKey("tiny", "knorm@0.5", "float32", "to-corrupt")
    tier.put(key, entry)
    tier.client.hset(tier._name(key), "payload", b"garbage")
    lookup = TieredStore([tier]).get(key)
    assert lookup.corrupt and lookup.entry.tensors is None
    assert not tier.contains(key)


def test_an_unreachable_redis_degrades_to_a_miss(tmp_path, entry):
    store = TieredStore.from_specs(1 << 30, [str(tmp_path), f"redis://127.0.0.1:{free_port()}/0"])
    store.put(KEY, entry)  # logged, not raised
    fresh = TieredStore.from_specs(1 << 30, [str(tmp_path), f"redis://127.0.0.1:{free_port()}/0"])
    assert fresh.get(KEY).tier == "disk"


@pytest.mark.parametrize(
    "changed", [{"chunk_size": 128}, {"head_profile": "3f2a"}, {"format": FORMAT - 1}, {"scope": "other"}]
)
def test_keys_separate_chunk_size_head_profile_and_format(tmp_path, entry, changed):
    key = dataclasses.replace(KEY, chunk_size=256)
    DiskTier(tmp_path).put(key, entry)
    assert TieredStore([DiskTier(tmp_path)]).get(key).tier == "disk"
    other = dataclasses.replace(key, **changed)
    assert other.digest() != key.digest()
    lookup = TieredStore([DiskTier(tmp_path)]).get(other)
    assert lookup.entry is None and not lookup.corrupt


def test_redis_entries_expire_after_the_store_ttl_and_a_hit_renews_it(redis_url, entry):
    store = TieredStore.from_specs(1 << 30, [redis_url], redis_ttl=3600)
    key = ContextKey("tiny", "knorm@0.5", "float32", "expiring")
    store.put(key, entry)
    (redis,) = store.tiers[1:]
    name = redis._name(key)
    assert 3590 <= redis.client.ttl(name) <= 3600
    redis.client.expire(name, 100)
    assert redis.get(key) is not None and redis.client.ttl(name) > 3500
    forever = TieredStore.from_specs(1 << 30, [redis_url])
    forever.put(key, entry)
    assert redis.client.ttl(name) == -1  # no expiry
    for each in (store, forever):
        each.close()


def test_a_recipe_reading_a_head_profile_keys_its_entries_by_that_profile():
    assert profile_digest(Recipe.parse("snapkv@0.5"), "smollm2-135m") == "none"
    shipped = profile_digest(Recipe.parse("duo:retrieval=0.5"), "smollm2-135m")
    assert len(shipped) == 16 and shipped not in ("none", "missing")
    assert profile_digest(Recipe.parse("duo"), "/no/such-model") == "missing"
