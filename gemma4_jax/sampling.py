"""Token selection: greedy, temperature / top-k / top-p, and the speculative acceptance rules."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


MIN_TEMPERATURE = 1e-4  # below it sampling is greedy in all but name, and float32 overflows


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Warp:
    """How logits become a distribution. temperature 0 means greedy.

    Inside a compiled program the temperature and top-p are traced values (`static()` gives the part
    that shapes the program, `values()` the numbers, `bind` joins them), so trying another
    temperature or top-p does not recompile; greedy vs sampling and top-k do."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), (np.floating, np.integer)):
                object.__setattr__(self, name, float(getattr(self, name)))
        if not isinstance(self.temperature, (int, float)):
            return  # bound to traced values (see `bind`): checked when the Warp was made
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T would overflow float32 into NaN probabilities
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p == 1:
            object.__setattr__(self, "top_p", None)  # keeps everything: the same as no top-p

    @property
    def greedy(self) -> bool:
        return isinstance(self.temperature, (int, float)) and self.temperature == 0

    def static(self) -> "Warp":
        """What the compiled program depends on: greedy or not, top-k, whether there is a top-p."""
        if self.greedy:
            return Warp()
        return Warp(1.0, self.top_k, None if self.top_p is None else 0.5)

    def values(self) -> jax.Array:
        """[temperature, top_p] as float32, the traced half (unused when greedy)."""
        return jnp.asarray([self.temperature or 1.0, 1.0 if self.top_p is None else self.top_p], jnp.float32)

    def bind(self, values: jax.Array) -> "Warp":
        """This static Warp with the traced numbers of `values()`."""
        if self.greedy:
            return self
        return Warp(values[0], self.top_k, None if self.top_p is None else values[1])

    def probs(self, logits: jax.Array) -> jax.Array:
        """fp32 probabilities [..., V]: temperature, then top-k, then top-p (the reference's order)."""
        x = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
            x = jnp.where(x >= kth, x, -jnp.inf)
        p = jax.nn.softmax(x, axis=-1)
        if self.top_p is not None:
            desc = -jnp.sort(-p, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            keep = (jnp.cumsum(desc, axis=-1) - desc) < self.top_p
            cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
            p = jnp.where(p >= cutoff, p, 0.0)
            p = p / jnp.sum(p, axis=-1, keepdims=True)
        return p


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per row from probabilities [..., V]."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def select(key: jax.Array, warp: Warp, logits: jax.Array) -> jax.Array:
    if warp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(key, warp.probs(logits))


def accept_greedy(drafts: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """drafts [B, K], target logits [B, K+1, V] -> (accepted count a [B], next token [B]): the longest
    prefix of drafts equal to the target's argmax, then the target's token after it."""
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    K = drafts.shape[1]
    a = jnp.sum(jnp.cumprod(drafts == target[:, :K], axis=1), axis=1)
    return a, jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]


def accept_sampled(key: jax.Array, drafts: jax.Array, q: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact speculative sampling (Leviathan et al., Chen et al.). drafts [B, K] were sampled from the
    drafter's warped q [B, K, V]; p [B, K+1, V] is the target's warped distribution. Draft j is
    accepted with probability min(1, p/q); at the first rejection the token comes from
    normalize(max(p - q, 0)); when all K are accepted, a bonus token from p. The output is then
    distributed exactly as sampling from the target."""
    B, K = drafts.shape
    k_accept, k_token = jax.random.split(key)
    pd = jnp.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, (B, K))
    a = jnp.sum(jnp.cumprod(u * qd < pd, axis=1), axis=1)  # u < p/q without dividing by q
    rows = jnp.arange(B)
    p_a = p[rows, a]
    q_a = jnp.concatenate([q, jnp.zeros((B, 1, p.shape[-1]), q.dtype)], axis=1)[rows, a]  # q = 0 past the drafts: bonus ~ p
    resid = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_a)
    return a, sample(k_token, resid)
