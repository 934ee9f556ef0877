"""Hugging Face safetensors checkpoints -> parameter pytrees.

The converter is a rename table plus one transform per tensor. Every tensor's shape is checked, and
completeness is checked both ways: every source key is used or deliberately skipped, every parameter
is filled. Tensors are read lazily (memory-mapped) one at a time and placed straight into their
target sharding, so peak host memory is about the final parameters plus one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import jax
import ml_dtypes
import numpy as np

from gemma4_jax.config import Config
from gemma4_jax.params import Param, is_param


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file and tensor."""


_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _natural(v) -> bool:
    return type(v) is int and v >= 0  # bool is an int subclass: refused


class SafetensorsFile:
    """Lazy reader of one .safetensors file: the header is parsed and checked against the file size
    up front (a truncated download fails here, naming the file), tensors are memory-mapped on read."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file, or truncated ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise CheckpointError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, "
                                          f"file of {size})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (bad header)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.entries = {}
        spans = []
        for name, e in header.items():
            # A malformed entry would otherwise surface far from the file, or read the wrong bytes.
            try:
                dtype, shape, offsets = e["dtype"], list(e["shape"]), list(e["data_offsets"])
            except (TypeError, KeyError):
                raise CheckpointError(f"{path}: not a safetensors file (bad header entry for {name!r})") from None
            if not (isinstance(dtype, str) and len(offsets) == 2 and all(_natural(v) for v in shape + offsets)):
                raise CheckpointError(f"{path}: not a safetensors file (bad header entry for {name!r}: dtype, "
                                      "shape and data_offsets must be a string and non-negative integers)")
            if dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            begin, end = offsets
            if end - begin != int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize:
                raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
            if self._base + end > size:
                raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {self._base + end}, "
                                      f"file has {size}")
            self.entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
            spans.append((begin, end, name))
        # As the safetensors format requires: the tensors tile the data area, no overlap, no gap.
        at = 0
        for begin, end, name in sorted(spans):
            if begin != at:
                raise CheckpointError(f"{path}: not a safetensors file (tensor {name!r} starts at data byte "
                                      f"{begin}, expected {at}: tensors overlap or leave a gap)")
            at = end
        if self._base + at != size:
            raise CheckpointError(f"{path}: {size - self._base - at} bytes after the last tensor "
                                  "(not a safetensors file, or a corrupted one)")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        begin, _ = e["data_offsets"]
        shape = tuple(e["shape"])
        return np.memmap(self.path, dtype=_DTYPES[e["dtype"]], mode="r", offset=self._base + begin,
                         shape=shape if shape else (1,)).reshape(shape)


class Checkpoint:
    """All tensors of a checkpoint directory: `model.safetensors`, or shards listed in
    `model.safetensors.index.json`. Like transformers, a `model.safetensors` wins over an index next
    to it (`save_pretrained` leaves a stale index behind when it rewrites a sharded checkpoint whole)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(single):
            f = SafetensorsFile(single)
            self.where = {name: f for name in f.entries}
        elif os.path.exists(index):
            self.where = _sharded(directory, index)
        else:
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def read(self, name: str) -> np.ndarray:
        return self.where[name].read(name)


def _sharded(directory: str, index: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> shard of an indexed checkpoint. Every shard tensor must be the one its index
    names, and shards are plain file names in the directory (they may be symlinks, as in the HF cache)."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{index}: unreadable index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: unreadable index (needs a 'weight_map' of tensor name -> file)")
    files = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(directory, shard)
        if shard in ("", ".", "..") or os.path.basename(shard) != shard or (os.altsep and os.altsep in shard):
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name in {directory}")
        if not os.path.exists(path):
            raise CheckpointError(f"{index}: shard {shard!r} is missing from {directory}")
        files[shard] = SafetensorsFile(path)
    for name, shard in weight_map.items():
        if name not in files[shard].entries:
            raise CheckpointError(f"{index}: tensor {name!r} is listed in {shard!r} but not found there")
    for shard, f in files.items():
        for name in f.entries:
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{index}: shard {shard!r} holds tensor {name!r}, which the index "
                                      + (f"places in {weight_map[name]!r}" if name in weight_map else "does not list"))
    return {name: files[shard] for name, shard in weight_map.items()}


# A rule: HF tensor name -> (expected HF shape, [(parameter path, transform from the HF array)]).
Rule = tuple[tuple[int, ...], list[tuple[tuple, Callable[[np.ndarray], np.ndarray]]]]


def _same(x):
    return x


def _t(x):
    return x.T


def target_rules(cfg: Config, prefix: str) -> tuple[dict[str, Rule], set[str]]:
    """Rename table of a Gemma 4 text model whose tensor names start with `prefix` (`model.` or
    `model.language_model.`), and the names that may be present but are deliberately unused."""
    D, N, L, P = cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.ple_dim
    rules: dict[str, Rule] = {
        "embed_tokens.weight": ((cfg.vocab_size, D), [(("embed",), _same)]),
        "norm.weight": ((D,), [(("final_norm",), _same)]),
    }
    ignorable = set()
    if P:
        Vp = cfg.ple_vocab_size
        rules["embed_tokens_per_layer.weight"] = ((Vp, L * P), [(("ple", "embed"), lambda w: w.reshape(Vp, L, P))])
        rules["per_layer_model_projection.weight"] = (
            (L * P, D), [(("ple", "proj"), lambda w: w.reshape(L, P, D).transpose(2, 0, 1))])
        rules["per_layer_projection_norm.weight"] = ((P,), [(("ple", "norm"), _same)])
    for i, spec in enumerate(cfg.layers):
        H, K, F = spec.head_dim, spec.num_kv_heads, spec.mlp_width
        pre = f"layers.{i}."
        lay = ("layers", i)
        heads_in = lambda n, h=H: (lambda w: w.reshape(n, h, D).transpose(2, 0, 1))  # [n*H, D] -> [D, n, H]
        add = {
            "input_layernorm.weight": ((D,), [(lay + ("attn_norm",), _same)]),
            "post_attention_layernorm.weight": ((D,), [(lay + ("post_attn_norm",), _same)]),
            "pre_feedforward_layernorm.weight": ((D,), [(lay + ("pre_mlp_norm",), _same)]),
            "post_feedforward_layernorm.weight": ((D,), [(lay + ("post_mlp_norm",), _same)]),
            "layer_scalar": ((1,), [(lay + ("scalar",), _same)]),
            "self_attn.q_proj.weight": ((N * H, D), [(lay + ("attn", "q"), heads_in(N))]),
            "self_attn.q_norm.weight": ((H,), [(lay + ("attn", "q_norm"), _same)]),
            "self_attn.o_proj.weight": ((D, N * H), [(lay + ("attn", "o"),
                                                      lambda w, h=H: w.reshape(D, N, h).transpose(1, 2, 0))]),
            "mlp.gate_proj.weight": ((F, D), [(lay + ("mlp", "gate"), _t)]),
            "mlp.up_proj.weight": ((F, D), [(lay + ("mlp", "up"), _t)]),
            "mlp.down_proj.weight": ((D, F), [(lay + ("mlp", "down"), _t)]),
        }
        if spec.owns_kv:
            add["self_attn.k_proj.weight"] = ((K * H, D), [(lay + ("attn", "k"), heads_in(K))])
            add["self_attn.k_norm.weight"] = ((H,), [(lay + ("attn", "k_norm"), _same)])
            if spec.has_v:
                add["self_attn.v_proj.weight"] = ((K * H, D), [(lay + ("attn", "v"), heads_in(K))])
        else:  # Google's files carry unused k/v tensors on KV-shared layers; save_pretrained drops them
            ignorable |= {prefix + pre + f"self_attn.{n}.weight" for n in ("k_proj", "v_proj", "k_norm", "v_norm")}
        if cfg.moe:
            E, Fe = cfg.num_experts, cfg.moe_intermediate_size
            add.update({
                "router.proj.weight": ((E, D), [(lay + ("moe", "router"), _t)]),
                "router.scale": ((D,), [(lay + ("moe", "router_scale"), _same)]),
                "router.per_expert_scale": ((E,), [(lay + ("moe", "expert_scale"), _same)]),
                "experts.gate_up_proj": ((E, 2 * Fe, D), [
                    (lay + ("moe", "gate"), lambda w, f=Fe: w[:, :f].transpose(0, 2, 1)),
                    (lay + ("moe", "up"), lambda w, f=Fe: w[:, f:].transpose(0, 2, 1))]),
                "experts.down_proj": ((E, D, Fe), [(lay + ("moe", "down"), lambda w: w.transpose(0, 2, 1))]),
                "pre_feedforward_layernorm_2.weight": ((D,), [(lay + ("moe", "pre_norm"), _same)]),
                "post_feedforward_layernorm_1.weight": ((D,), [(lay + ("moe", "post_norm_dense"), _same)]),
                "post_feedforward_layernorm_2.weight": ((D,), [(lay + ("moe", "post_norm_experts"), _same)]),
            })
        if P:
            add.update({
                "per_layer_input_gate.weight": ((P, D), [(lay + ("ple", "gate"), _t)]),
                "per_layer_projection.weight": ((D, P), [(lay + ("ple", "proj"), _t)]),
                "post_per_layer_input_norm.weight": ((D,), [(lay + ("ple", "norm"), _same)]),
            })
        rules.update({pre + k: v for k, v in add.items()})
    return {prefix + k: v for k, v in rules.items()}, ignorable


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def convert(ckpt: Checkpoint, rules: dict[str, Rule], ignorable: set[str], skip: tuple[str, ...],
            decl, shardings, dtype, where: str):
    """Fills the declaration tree from `ckpt`. Every tensor must have a rule, be ignorable, or start
    with one of the `skip` prefixes (deliberately unused parts, e.g. vision/audio towers)."""
    for name in ckpt.keys():
        if name not in rules and name not in ignorable and not name.startswith(skip):
            raise CheckpointError(f"{where}: unknown tensor {name!r}")
    missing = [k for k in rules if k not in ckpt.where]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    out = jax.tree.map(lambda p: None, decl, is_leaf=is_param)
    out = _to_mutable(out)
    for name, (hf_shape, targets) in rules.items():
        if ckpt.shape(name) != hf_shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(ckpt.shape(name))}, "
                                  f"expected {list(hf_shape)}")
        raw = ckpt.read(name)
        for path, fn in targets:
            p: Param = _get(decl, path)
            _check_dtype(raw, p, name, where)
            value = np.asarray(fn(raw)).astype(p.dtype or dtype)
            assert value.shape == p.shape, (name, value.shape, p.shape)
            if p.init == "arange" and not np.array_equal(np.sort(value.ravel()), np.arange(value.size)):
                raise CheckpointError(f"{where}: tensor {name!r} must be a permutation of 0..{value.size - 1}")
            _set(out, path, _place(value, _get(shardings, path) if shardings is not None else None))
        del raw
    return out


def _check_dtype(raw: np.ndarray, p: Param, name: str, where: str) -> None:
    """Float parameters load from float32/bfloat16 (float64 too); float16 is refused rather than
    silently re-rounded. Index tables load from integer tensors."""
    if p.dtype is not None and np.issubdtype(np.dtype(p.dtype), np.integer):
        if raw.dtype not in (np.int32, np.int64):
            raise CheckpointError(f"{where}: tensor {name!r} is {raw.dtype}, expected int32 or int64")
    elif raw.dtype == np.float16:
        raise CheckpointError(f"{where}: tensor {name!r} is float16; gemma4-jax loads float32 and bfloat16 "
                              "checkpoints only (float16 overflows Gemma 4's activations): convert the "
                              "checkpoint to bfloat16 first")
    elif raw.dtype not in (np.float32, np.float64, ml_dtypes.bfloat16):
        raise CheckpointError(f"{where}: tensor {name!r} is {raw.dtype}, expected float32 or bfloat16")


def _to_mutable(tree):
    if isinstance(tree, dict):
        return {k: _to_mutable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_to_mutable(v) for v in tree]
    return tree


def _place(value: np.ndarray, sharding):
    if sharding is None:
        return jax.device_put(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
