"""KV cache: a pytree of per-layer buffers with pure write and rollback.

Only layers that compute K/V own buffers (KV-shared layers read their producer's). Every slot records
the absolute position it holds, so masks are computed from positions and stay right across
ring-buffer wrap-around and rollback:

* full layers keep `max_len` slots, slot = position;
* sliding layers keep a ring of `sliding_window + block` slots, slot = position % capacity. `block` is
  the most tokens a step may write and then roll back (speculative verification writes K+1), so a
  rollback never loses a key that a later query still needs.

Rows advance independently (`length` is per row). Rolling back is a length change, never a copy:
stale slots are masked out by `position < length` and overwritten by the next write.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gemma4_jax.config import FULL, SLIDING, Config


@flax.struct.dataclass
class KVCache:
    k: tuple  # per layer: [B, C, K, H] or None (KV-shared layer)
    v: tuple
    pos: dict  # kind -> [B, C] int32 absolute position held by each slot (-1: empty)
    length: jax.Array  # [B] int32 tokens committed per row (= next position)
    kinds: tuple = flax.struct.field(pytree_node=False, default=())  # per layer: SLIDING or FULL

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    def capacity(self, kind: str) -> int:
        return self.pos[kind].shape[1]

    @property
    def max_len(self) -> int:
        return self.capacity(FULL)


def capacity(cfg: Config, kind: str, max_len: int, block: int) -> int:
    if kind == FULL:
        return max_len
    return min(cfg.sliding_window + block, max_len)


def init(cfg: Config, batch: int, max_len: int, *, block: int = 16, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens; steps write at most `block` tokens
    that may later be rolled back (prefill blocks may be longer: they are never rolled back)."""
    ks, vs = [], []
    for spec in cfg.layers:
        if not spec.owns_kv:
            ks.append(None)
            vs.append(None)
            continue
        shape = (batch, capacity(cfg, spec.kind, max_len, block), spec.num_kv_heads, spec.head_dim)
        ks.append(jnp.zeros(shape, dtype))
        vs.append(jnp.zeros(shape, dtype))
    pos = {kind: jnp.full((batch, capacity(cfg, kind, max_len, block)), -1, jnp.int32) for kind in (SLIDING, FULL)}
    return KVCache(k=tuple(ks), v=tuple(vs), pos=pos, length=jnp.zeros((batch,), jnp.int32),
                   kinds=tuple(s.kind for s in cfg.layers))


def write_slots(length: jax.Array, num_new: jax.Array, steps: int, cap: int, ring: bool) -> jax.Array:
    """Slot of each new token [B, T]; `cap` (out of range, dropped by the scatter) where nothing is
    written: tokens past a row's `num_new`, tokens a longer block would overwrite in the same ring,
    and positions past a full layer's capacity."""
    j = jnp.arange(steps)[None, :]
    pos = length[:, None] + j
    keep = (j < num_new[:, None]) & (j >= num_new[:, None] - cap)
    slot = pos % cap if ring else pos
    keep &= slot < cap
    return jnp.where(keep, slot, cap)


def scatter(buf: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")


def commit(cache: KVCache, new_k: list, new_v: list, num_new: jax.Array) -> KVCache:
    """Writes each producing layer's new K/V [B, T, K, H] and advances the rows by `num_new`."""
    steps = next(k for k in new_k if k is not None).shape[1]
    slots = {kind: write_slots(cache.length, num_new, steps, cache.capacity(kind), kind == SLIDING)
             for kind in cache.pos}
    ks = tuple(None if b is None else scatter(b, slots[kd], n) for b, n, kd in zip(cache.k, new_k, cache.kinds))
    vs = tuple(None if b is None else scatter(b, slots[kd], n) for b, n, kd in zip(cache.v, new_v, cache.kinds))
    positions = cache.length[:, None] + jnp.arange(steps)[None, :]
    pos = {kind: scatter(p, slots[kind], positions) for kind, p in cache.pos.items()}
    return cache.replace(k=ks, v=vs, pos=pos, length=cache.length + num_new)


def rollback(cache: KVCache, n: jax.Array) -> KVCache:
    """Forgets the last `n` tokens of each row ([B] or scalar): a length change, no data moves."""
    return cache.replace(length=jnp.maximum(cache.length - n, 0))
