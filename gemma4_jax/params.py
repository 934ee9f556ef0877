"""Parameter pytrees. Each parameter is declared once: shape, logical axes, initialiser.

Layouts are einsum-friendly (input dimension first), not torch's [out, in]; checkpoint.py owns the
transposes. Absent parts are None (no v on k_eq_v full layers, no k/v on KV-shared layers, no PLE).
Logical axis names are mapped to mesh axes by sharding.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemma4_jax.config import Config


@dataclasses.dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dimension
    init: str = "normal"  # "normal" (std 0.02) | "ones" | "arange"
    dtype: str | None = None  # None: the model's dtype; e.g. "int32" for index tables

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_param(x) -> bool:
    return isinstance(x, Param)


def _norm(dim: int) -> Param:
    return Param((dim,), (None,), "ones")


def declare(cfg: Config) -> dict:
    """The parameter tree of a target model, as Param declarations."""
    D, N, V = cfg.hidden_size, cfg.num_heads, cfg.vocab_size
    L, P = cfg.num_layers, cfg.ple_dim
    layers = []
    for spec in cfg.layers:
        H, K, F = spec.head_dim, spec.num_kv_heads, spec.mlp_width
        own = spec.owns_kv
        layer = {
            "attn_norm": _norm(D),
            "post_attn_norm": _norm(D),
            "pre_mlp_norm": _norm(D),
            "post_mlp_norm": _norm(D),
            "scalar": Param((1,), (None,), "ones"),
            "attn": {
                "q": Param((D, N, H), ("embed", "heads", None)),
                "k": Param((D, K, H), ("embed", "kv_heads", None)) if own else None,
                "v": Param((D, K, H), ("embed", "kv_heads", None)) if spec.has_v else None,
                "o": Param((N, H, D), ("heads", None, "embed")),
                "q_norm": _norm(H),
                "k_norm": _norm(H) if own else None,
            },
            "mlp": {
                "gate": Param((D, F), ("embed", "mlp")),
                "up": Param((D, F), ("embed", "mlp")),
                "down": Param((F, D), ("mlp", "embed")),
            },
            "moe": None,
            "ple": None,
        }
        if cfg.moe:
            E, Fe = cfg.num_experts, cfg.moe_intermediate_size
            layer["moe"] = {
                "router": Param((D, E), ("embed", None)),
                "router_scale": _norm(D),
                "expert_scale": Param((E,), (None,), "ones"),
                "gate": Param((E, D, Fe), ("experts", "embed", "expert_mlp")),
                "up": Param((E, D, Fe), ("experts", "embed", "expert_mlp")),
                "down": Param((E, Fe, D), ("experts", "expert_mlp", "embed")),
                "pre_norm": _norm(D),
                "post_norm_dense": _norm(D),
                "post_norm_experts": _norm(D),
            }
        if P:
            layer["ple"] = {
                "gate": Param((D, P), ("embed", None)),
                "proj": Param((P, D), (None, "embed")),
                "norm": _norm(D),
            }
        layers.append(layer)
    tree = {"embed": Param((V, D), ("vocab", "embed")), "final_norm": _norm(D), "ple": None, "layers": layers}
    if P:
        tree["ple"] = {
            "embed": Param((cfg.ple_vocab_size, L, P), ("vocab", None, None)),
            "proj": Param((D, L, P), ("embed", None, None)),
            "norm": _norm(P),
        }
    return tree


def abstract(decl, dtype=jnp.bfloat16):
    """ShapeDtypeStructs for a declaration tree (no allocation)."""
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.dtype(p.dtype or dtype)), decl, is_leaf=is_param)


def init(decl, key: jax.Array, dtype=jnp.float32):
    """Random parameters for a declaration tree (training from scratch, tests)."""
    leaves, treedef = jax.tree.flatten(decl, is_leaf=is_param)
    keys = jax.random.split(key, len(leaves))

    def one(p: Param, k):
        dt = jnp.dtype(p.dtype or dtype)
        if p.init == "ones":
            return jnp.ones(p.shape, dt)
        if p.init == "arange":
            return jnp.arange(p.shape[0], dtype=dt)
        return (0.02 * jax.random.normal(k, p.shape, jnp.float32)).astype(dt)

    return treedef.unflatten([one(p, k) for p, k in zip(leaves, keys)])


def count(decl) -> int:
    """Number of parameters in a declaration tree."""
    n = 0
    for p in jax.tree.leaves(decl, is_leaf=is_param):
        size = 1
        for s in p.shape:
            size *= s
        n += size
    return n
