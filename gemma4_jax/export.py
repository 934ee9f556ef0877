"""Parameter pytrees -> Hugging Face checkpoint directories (config.json, model.safetensors,
generation_config.json) that transformers 5.23.0 and `gemma4_jax.load` both read.

The tensor names come from the loader's rename tables (`checkpoint.target_rules`, `drafter.rules`):
one source of truth. Their transforms are gathers (reshape, transpose, slice), so each is inverted
by running it on an array of flat indices: the result tells, for every parameter element, which
element of the HF tensor it came from. Every inverse is then checked by running the forward
transform on what it wrote, and every HF element must be written exactly once.

Writes are atomic: everything goes into a hidden temporary directory next to the destination,
which is renamed into place at the end. An interrupted export leaves no directory that looks
complete (at worst a `.NAME.*.partial` directory).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Callable, Iterable

import jax
import numpy as np
import safetensors.numpy

from gemma4_jax import checkpoint, drafter as drafter_lib
from gemma4_jax.config import FULL, SLIDING, Config, Rope
from gemma4_jax.drafter import DrafterConfig

_HF_KIND = {SLIDING: "sliding_attention", FULL: "full_attention"}
# Token ids of Gemma's vocabulary layout, used when the model carries no generation_config.
DEFAULT_SPECIAL = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
# Tokenizer files copied next to an exported drafter / target when the source directory has them.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


# --- config.json ---------------------------------------------------------------------------------

def _rope_dict(rope: Rope, kind: str) -> dict:
    if kind == SLIDING and rope.fraction == 1.0 and rope.factor == 1.0:
        return {"rope_type": "default", "rope_theta": rope.theta}
    out = {"rope_type": "proportional", "rope_theta": rope.theta, "partial_rotary_factor": rope.fraction}
    if rope.factor != 1.0:
        out["factor"] = rope.factor
    return out


def _dtype_name(params) -> str:
    return np.dtype(params["embed"].dtype).name if params is not None else "float32"


def _special(generation_config: dict | None) -> dict:
    gen = generation_config or {}
    return {k: gen.get(k, v) for k, v in DEFAULT_SPECIAL.items()}


def text_config_dict(cfg: Config) -> dict:
    """A `gemma4_text` config dict for `cfg`, in the form save_pretrained writes (`per_layer_config`
    for the full-attention layers' head dim and KV heads)."""
    full = {"head_dim": cfg.global_head_dim}
    if cfg.num_global_kv_heads != cfg.num_kv_heads:
        full["num_key_value_heads"] = cfg.num_global_kv_heads
    return {
        "model_type": "gemma4_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "per_layer_config": {str(i): dict(full) for i, t in enumerate(cfg.layer_types) if t == FULL},
        "layer_types": [_HF_KIND[t] for t in cfg.layer_types],
        "sliding_window": cfg.sliding_window,
        "rope_parameters": {_HF_KIND[SLIDING]: _rope_dict(cfg.rope_sliding, SLIDING),
                            _HF_KIND[FULL]: _rope_dict(cfg.rope_full, FULL)},
        "rms_norm_eps": cfg.rms_norm_eps,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "num_kv_shared_layers": cfg.num_kv_shared_layers,
        "attention_k_eq_v": cfg.k_eq_v,
        "use_double_wide_mlp": cfg.double_wide_mlp,
        "hidden_size_per_layer_input": cfg.ple_dim,
        "vocab_size_per_layer_input": cfg.ple_vocab_size,
        "enable_moe_block": cfg.moe,
        "num_experts": cfg.num_experts or None,
        "top_k_experts": cfg.top_k_experts or None,
        "moe_intermediate_size": cfg.moe_intermediate_size or None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": True,
    }


def hf_config_dict(cfg: Config, *, dtype: str = "float32", generation_config: dict | None = None) -> dict:
    """config.json of a `Gemma4ForCausalLM` (model_type `gemma4_text`) with config `cfg`."""
    return {"architectures": ["Gemma4ForCausalLM"], **text_config_dict(cfg), "dtype": dtype,
            **_special(generation_config)}


def hf_drafter_config_dict(dcfg: DrafterConfig, *, dtype: str = "float32",
                           generation_config: dict | None = None) -> dict:
    """config.json of a `Gemma4AssistantForCausalLM` (model_type `gemma4_assistant`)."""
    text = text_config_dict(dcfg.text)
    # What transformers' validate_architecture demands of a drafter: every layer reads the target's K/V,
    # no per-layer inputs; and the drafter head has no soft-cap.
    text.update(num_kv_shared_layers=dcfg.text.num_layers, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0, final_logit_softcapping=None, **_special(generation_config))
    out = {"architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant", "text_config": text,
           "backbone_hidden_size": dcfg.backbone_hidden_size, "use_ordered_embeddings": dcfg.ordered_embeddings,
           "tie_word_embeddings": True, "dtype": dtype}
    if dcfg.ordered_embeddings:
        out.update(num_centroids=dcfg.num_centroids, centroid_intermediate_top_k=dcfg.centroid_top_k)
    return out


# --- tensors -------------------------------------------------------------------------------------

def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _paths(params) -> set[tuple]:
    """Paths of every array leaf (absent parts, None, are not leaves)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path) for path, _ in flat}


def _invert(name: str, hf_shape: tuple[int, ...], targets, params) -> np.ndarray:
    """The HF tensor `name` rebuilt from the parameters its rule fills."""
    n = math.prod(hf_shape)
    index = np.arange(n, dtype=np.int64 if n >= 2**31 else np.int32).reshape(hf_shape)
    out, written, total = None, np.zeros(n, bool), 0
    for path, fn in targets:
        value = np.asarray(jax.device_get(_get(params, path)))
        src = np.asarray(fn(index))
        if src.shape != value.shape or not np.issubdtype(src.dtype, np.integer):
            raise ValueError(f"{name}: the loader's transform for {path} is not an index gather; cannot invert it")
        if out is None:
            out = np.zeros(n, value.dtype)
        out[src.reshape(-1)] = value.reshape(-1)
        written[src.reshape(-1)] = True
        total += src.size
    if total != n or not written.all():  # every element written, none twice
        raise ValueError(f"{name}: the loader's transforms do not cover every element exactly once")
    out = out.reshape(hf_shape)
    for path, fn in targets:  # the inverse must reproduce every parameter exactly
        if not np.array_equal(np.asarray(fn(out)), np.asarray(jax.device_get(_get(params, path)))):
            raise ValueError(f"{name}: inverting the loader's transform for {path} failed")
    return out


def to_hf_tensors(rules: dict, params) -> dict[str, np.ndarray]:
    """HF tensors (torch layout) from `params`, by inverting the loader's rename table `rules`.
    Every parameter must be used by exactly one rule. Index tables (token ordering) are written as
    int64, as torch saves them."""
    used: list[tuple] = []
    out = {}
    for name, (hf_shape, targets) in rules.items():
        t = _invert(name, tuple(hf_shape), targets, params)
        out[name] = np.ascontiguousarray(t.astype(np.int64) if np.issubdtype(t.dtype, np.integer) else t)
        used += [tuple(path) for path, _ in targets]
    left = _paths(params) - set(used)
    if left or len(used) != len(set(used)):
        raise ValueError(f"parameters not exported: {sorted(map(str, left))[:3]}" if left
                         else "a parameter is claimed by two HF tensors")
    return out


# --- directories ---------------------------------------------------------------------------------

def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _is_checkpoint_dir(path: str) -> bool:
    entries = os.listdir(path)
    return "config.json" in entries and not any(os.path.isdir(os.path.join(path, e)) for e in entries)


def check_destination(dest: str, overwrite: bool, replaceable: Callable[[str], bool] = _is_checkpoint_dir) -> None:
    """FileExistsError unless `dest` may be written: absent or an empty directory, or with
    `overwrite` a directory for which `replaceable(dest)` holds (default: a checkpoint directory:
    a config.json, no subdirectories). Never a plain file."""
    if not os.path.exists(dest) or (os.path.isdir(dest) and not os.listdir(dest)):
        return
    if not overwrite:
        raise FileExistsError(f"{dest}: already exists and is not empty")
    if not os.path.isdir(dest) or not replaceable(dest):
        raise FileExistsError(f"{dest}: will not replace it: not a checkpoint directory (a config.json, "
                              "no subdirectories)")


def atomic_directory(dest: str, write: Callable[[str], None], *, overwrite: bool = False,
                     replaceable: Callable[[str], bool] = _is_checkpoint_dir) -> str:
    """Runs `write(tmp)` on a fresh temporary directory next to `dest`, then renames it to `dest`.
    `dest` must pass `check_destination`; an existing one is replaced whole, or put back if the
    replacement fails. The result gets the usual permissions (umask), not mkdtemp's owner-only
    ones; files in subdirectories keep theirs."""
    dest = os.path.abspath(dest)
    parent, base = os.path.split(dest)
    check_destination(dest, overwrite, replaceable)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".partial", dir=parent)
    old = moved = None
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        for name in os.listdir(tmp):  # on disk before the rename makes the directory visible
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                os.chmod(path, 0o666 & ~mask)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if os.path.isdir(dest):  # check_destination let only a directory through
            old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            moved = os.path.join(old, base)
            os.rename(dest, moved)
        os.rename(tmp, dest)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved is not None and os.path.isdir(moved) and not os.path.exists(dest):
            os.rename(moved, dest)  # the replacement failed: the old checkpoint comes back
        raise
    finally:
        if old is not None and not (moved and os.path.isdir(moved) and not os.path.isdir(dest)):
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every filesystem lets a directory be synced
        pass
    finally:
        os.close(fd)


def _export(path, config: dict, tensors_fn, generation_config: dict, extra_files: Iterable[str], overwrite: bool):
    extra = list(extra_files)
    for src in extra:
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src}: no such file to copy into the checkpoint")

    def write(tmp):
        safetensors.numpy.save_file(tensors_fn(), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "generation_config.json"), generation_config)
        for src in extra:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
        _write_json(os.path.join(tmp, "config.json"), config)

    return atomic_directory(path, write, overwrite=overwrite)


def tokenizer_files(directory: str | None) -> list[str]:
    """The tokenizer files present in `directory` (to ship them with an export)."""
    if not directory:
        return []
    return [os.path.join(directory, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]


def export_target(path: str, cfg: Config, params, *, generation_config: dict | None = None,
                  extra_files: Iterable[str] = (), overwrite: bool = False) -> str:
    """Writes a `Gemma4ForCausalLM` checkpoint directory (`model.` tensor prefix) at `path`, in the
    parameters' dtype. `extra_files` (e.g. the tokenizer) are copied in. Returns the absolute path."""
    gen = {**_special(generation_config), **(generation_config or {})}
    rules, _ = checkpoint.target_rules(cfg, "model.")
    config = hf_config_dict(cfg, dtype=_dtype_name(params), generation_config=gen)
    return _export(path, config, lambda: to_hf_tensors(rules, params), gen, extra_files, overwrite)


def export_drafter(path: str, dcfg: DrafterConfig, params, *, generation_config: dict | None = None,
                   num_assistant_tokens: int | None = None, extra_files: Iterable[str] = (),
                   overwrite: bool = False) -> str:
    """Writes a `Gemma4AssistantForCausalLM` checkpoint directory at `path`. `num_assistant_tokens`
    (the draft length transformers and `generate` use by default) goes into generation_config.json."""
    gen = {**_special(generation_config), **(generation_config or {})}
    if num_assistant_tokens is not None:
        gen["num_assistant_tokens"] = int(num_assistant_tokens)
    rules, _ = drafter_lib.rules(dcfg)
    config = hf_drafter_config_dict(dcfg, dtype=_dtype_name(params), generation_config=gen)
    return _export(path, config, lambda: to_hf_tensors(rules, params), gen, extra_files, overwrite)


def save(path: str, obj, **kwargs) -> str:
    """Exports a loaded or trained `Model` / `Drafter` (see `export_target`, `export_drafter`);
    the generation config and, when the source directory has them, tokenizer files come along."""
    from gemma4_jax.api import Drafter

    kwargs.setdefault("generation_config", obj.generation_config)
    kwargs.setdefault("extra_files", tokenizer_files(obj.path))
    fn = export_drafter if isinstance(obj, Drafter) else export_target
    return fn(path, obj.config, obj.params, **kwargs)
