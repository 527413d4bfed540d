"""Paged KV storage: block pools, per-head block tables, the cache layer built on them."""
