"""Meshes and the logical-axis -> mesh-axis rules.

Parameters carry logical axis names (params.py); these rules map them onto a 2-D mesh of
`data` (batch) x `model` (tensor parallel). Changing strategy means editing RULES.

A dimension that does not divide by its mesh axis is replicated on purpose (E2B has one KV head,
26B-A4B has two global KV heads): `spec()` drops the mapping for that dimension only.

Mesh axes are Auto: XLA propagates shardings from the parameters and the batch into the
activations. That keeps the model code free of per-einsum sharding annotations while the layouts
below decide where every weight lives.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma4_jax.params import Param, is_param

DATA, MODEL = "data", "model"

RULES: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,  # embedding rows and LM-head columns
    "heads": MODEL,
    "kv_heads": MODEL,  # replicated when the KV-head count does not divide (E2B: 1)
    "mlp": MODEL,
    "expert_mlp": MODEL,
    "experts": None,
    "embed": None,
}


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all). `model` defaults to what `data` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // data
    if data * model != len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.array(devices).reshape(data, model), (DATA, MODEL))


def spec(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh, rules=RULES) -> PartitionSpec:
    """The PartitionSpec the rules give a tensor of `shape` with logical `axes` on `mesh`."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} has {len(shape)} dimensions but {len(axes)} logical axes {axes}")
    out = []
    for size, name in zip(shape, axes):
        if name is not None and name not in rules:
            # A misspelt name would otherwise replicate silently.
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to RULES (None replicates)")
        mesh_axis = rules[name] if name is not None else None
        if mesh_axis is not None and (size % mesh.shape[mesh_axis] != 0 or mesh_axis in out):
            mesh_axis = None  # does not divide (or the mesh axis is taken): replicate this dimension on purpose
        out.append(mesh_axis)
    return PartitionSpec(*out)


def param_shardings(decl, mesh: Mesh, rules=RULES):
    """NamedShardings for a declaration tree (see params.declare)."""
    return jax.tree.map(lambda p: NamedSharding(mesh, spec(p.shape, p.axes, mesh, rules)), decl, is_leaf=is_param)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows over `data` when they divide, the rest replicated."""
    return NamedSharding(mesh, spec(shape, ("batch",) + (None,) * (len(shape) - 1), mesh))


def describe(decl, mesh: Mesh, rules=RULES) -> list[tuple[str, tuple, PartitionSpec]]:
    """(path, shape, spec) for every parameter: the sharding table, for READMEs and debugging."""
    flat = jax.tree_util.tree_flatten_with_path(decl, is_leaf=is_param)[0]
    return [(jax.tree_util.keystr(path), p.shape, spec(p.shape, p.axes, mesh, rules)) for path, p in flat]


def shard_bytes(p: Param, mesh: Mesh, itemsize: int, rules=RULES) -> int:
    """Bytes of one device's shard of a parameter."""
    ps = spec(p.shape, p.axes, mesh, rules)
    n = math.prod(p.shape)
    for axis in ps:
        if axis is not None:
            n //= mesh.shape[axis]
    return n * itemsize
