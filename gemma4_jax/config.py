"""Model configuration: one frozen, hashable dataclass built from a Hugging Face config.json.

This is the only module that knows Hugging Face's field names. Everything downstream reads the
static per-layer plan (`Config.layers`), never re-deriving rules from raw fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

SLIDING, FULL = "sliding", "full"
_HF_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}

# Defaults of transformers 5.23.0 for fields a hand-written config.json may leave out.
_TEXT_DEFAULTS = {
    "gemma4_text": dict(
        vocab_size=262144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
        sliding_window=512, final_logit_softcapping=None, vocab_size_per_layer_input=262144,
        hidden_size_per_layer_input=256, attention_k_eq_v=False, num_kv_shared_layers=0,
        enable_moe_block=False, use_double_wide_mlp=False, max_position_embeddings=131072,
    ),
    "gemma4_unified_text": dict(
        vocab_size=262144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
        sliding_window=1024, final_logit_softcapping=None, vocab_size_per_layer_input=0,
        hidden_size_per_layer_input=0, attention_k_eq_v=False, num_kv_shared_layers=0,
        enable_moe_block=False, use_double_wide_mlp=False, max_position_embeddings=262144,
    ),
}
_WRAPPERS = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
}


class ConfigError(ValueError):
    """A config.json we cannot interpret; the message names the file and field."""


# Fields we read that transformers 5.23.0 types as non-optional: `null` there is an error (its
# strict config refuses it too), not a silent fall-back to a default the weights were not made for.
_NOT_NULL = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "sliding_window", "rms_norm_eps", "attention_k_eq_v",
             "use_double_wide_mlp", "enable_moe_block", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
             "num_kv_shared_layers", "max_position_embeddings", "hidden_activation", "tie_word_embeddings",
             "attention_bias")


_REQUIRED = object()
_KINDS = {int: ("an integer", lambda v: type(v) is int),  # bool is an int subclass: refused; 64.9 not truncated
          float: ("a number", lambda v: type(v) in (int, float)),
          bool: ("true or false", lambda v: type(v) is bool)}  # "false" would otherwise read as true


def _get(c: dict, name: str, kind: type, where: str, default=_REQUIRED):
    """c[name] (or `default` when absent; a KeyError when required), checked to be of `kind`."""
    v = c[name] if default is _REQUIRED else c.get(name, default)
    label, ok = _KINDS[kind]
    if not ok(v):
        raise ConfigError(f"{where}: {name}={v!r} must be {label}")
    return kind(v)


@dataclasses.dataclass(frozen=True)
class Rope:
    theta: float
    fraction: float = 1.0  # share of frequency pairs that rotate ("proportional" RoPE)
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static plan of one decoder layer, derived once from the config."""

    index: int
    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    kv_source: int  # layer whose K/V this layer attends to: itself, a producer (KV-shared), -1: the target's
    mlp_width: int
    has_v: bool  # False on k_eq_v full layers: V is the normed, unrotated k_proj output

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.index


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    global_head_dim: int
    num_global_kv_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_sliding: Rope
    rope_full: Rope
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    num_kv_shared_layers: int = 0
    k_eq_v: bool = False
    double_wide_mlp: bool = False
    ple_dim: int = 0  # per-layer-embedding width P (0: no PLE)
    ple_vocab_size: int = 0
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    max_position_embeddings: int = 131072

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    @functools.cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        first = self.first_shared_layer
        specs = []
        for i, kind in enumerate(self.layer_types):
            full = kind == FULL
            shared = i >= first
            specs.append(LayerSpec(
                index=i,
                kind=kind,
                head_dim=self.global_head_dim if full else self.head_dim,
                num_kv_heads=self.num_global_kv_heads if full else self.num_kv_heads,
                kv_source=self.kv_layers.get(kind, -1) if shared else i,
                mlp_width=self.intermediate_size * (2 if (self.double_wide_mlp and shared) else 1),
                has_v=not (self.k_eq_v and full) and not shared,
            ))
        return tuple(specs)

    @functools.cached_property
    def kv_layers(self) -> dict[str, int]:
        """Per kind, the last layer that computes K/V: what KV-shared layers and the drafter read.
        Empty for a drafter, whose layers all read the target's K/V."""
        first = self.first_shared_layer
        return {t: max(i for i in range(first) if self.layer_types[i] == t) for t in set(self.layer_types[:first])}

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    def validate(self, where: str = "config") -> "Config":
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"{where}: {msg}")

        need(self.num_layers > 0, "num_hidden_layers must be positive")
        need(set(self.layer_types) <= {SLIDING, FULL}, f"layer_types {self.layer_types}")
        need(0 <= self.num_kv_shared_layers < self.num_layers,
             f"num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, {self.num_layers})")
        orphans = sorted(set(self.layer_types) - set(self.layer_types[: self.first_shared_layer]))
        need(not orphans, f"num_kv_shared_layers={self.num_kv_shared_layers} leaves {orphans} layers with no "
                          "earlier layer of their type that computes K/V")
        # Named as in config.json: the full layers' KV heads come from num_global_key_value_heads
        # (released form) or per_layer_config's num_key_value_heads (save_pretrained form).
        for kv, name in ((self.num_kv_heads, "num_key_value_heads"),
                         (self.num_global_kv_heads, "full-attention layers' num_global_key_value_heads")):
            need(kv > 0 and self.num_heads % kv == 0,
                 f"num_attention_heads={self.num_heads} is not a multiple of {name}={kv}")
        need(self.head_dim % 2 == 0 and self.global_head_dim % 2 == 0, "head dims must be even for RoPE")
        need(self.sliding_window > 0, "sliding_window must be positive")
        need(self.max_position_embeddings > 0, "max_position_embeddings must be positive")
        need(min(self.vocab_size, self.hidden_size, self.intermediate_size, self.head_dim) > 0,
             "vocab_size, hidden_size, intermediate_size and head_dim must be positive")
        if self.moe:
            need(0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0,
                 "enable_moe_block needs num_experts >= top_k_experts > 0 and moe_intermediate_size > 0")
        if self.ple_dim:
            need(self.ple_vocab_size > 0, "hidden_size_per_layer_input > 0 needs vocab_size_per_layer_input > 0")
        return self


def _rope(params: dict, hf_type: str, where: str) -> Rope:
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters[{hf_type!r}] must be an object, got {params!r}")
    kind = params.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise ConfigError(f"{where}: rope_parameters[{hf_type!r}].rope_type={kind!r} is not supported "
                          "(supported: 'default', 'proportional')")
    if "rope_theta" not in params:
        raise ConfigError(f"{where}: rope_parameters[{hf_type!r}] has no rope_theta")
    at = f"{where}: rope_parameters[{hf_type!r}]"
    fraction = _get(params, "partial_rotary_factor", float, at, 1.0) if kind == "proportional" else 1.0
    factor = _get(params, "factor", float, at, 1.0) if kind == "proportional" else 1.0
    return Rope(theta=_get(params, "rope_theta", float, at), fraction=fraction, factor=factor)


def text_config_dict(raw: dict, where: str) -> tuple[str, dict]:
    """Returns (text model_type, text config dict) for a target checkpoint's config.json."""
    model_type = raw.get("model_type")
    if model_type in _WRAPPERS:
        if not isinstance(raw.get("text_config"), dict):
            raise ConfigError(f"{where}: model_type {model_type!r} needs a text_config object")
        if raw.get("tie_word_embeddings") is False:
            raise ConfigError(f"{where}: tie_word_embeddings=false is not supported (Gemma 4 ties its LM head)")
        text = dict(raw["text_config"])
        return text.get("model_type", _WRAPPERS[model_type]), text
    if model_type in _TEXT_DEFAULTS:
        return model_type, raw
    raise ConfigError(f"{where}: unsupported model_type {model_type!r}; expected one of "
                      f"{sorted(set(_WRAPPERS) | set(_TEXT_DEFAULTS))}")


def from_hf_text(text: dict, model_type: str, where: str) -> Config:
    """Builds a Config from a `gemma4_text` / `gemma4_unified_text` dict (HF field names)."""
    if model_type not in _TEXT_DEFAULTS:
        raise ConfigError(f"{where}: unsupported text model_type {model_type!r}")
    nulls = [k for k in _NOT_NULL if k in text and text[k] is None]
    if nulls:
        raise ConfigError(f"{where}: {nulls[0]} is null" + (f" (and {', '.join(nulls[1:])})" if nulls[1:] else ""))
    c = {**_TEXT_DEFAULTS[model_type], **{k: v for k, v in text.items() if v is not None or k == "final_logit_softcapping"}}

    act = c.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}: hidden_activation={act!r} is not supported (only 'gelu_pytorch_tanh')")
    if c.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported (Gemma 4 has no attention biases)")
    if c.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{where}: use_bidirectional_attention='all' is not supported (causal decoding only)")
    if c.get("tie_word_embeddings", True) is not True:
        raise ConfigError(f"{where}: tie_word_embeddings=false is not supported (Gemma 4 ties its LM head)")

    n_layers = _get(c, "num_hidden_layers", int, where)
    hf_types = c.get("layer_types")
    if hf_types is not None and not (isinstance(hf_types, list) and all(isinstance(t, str) for t in hf_types)):
        raise ConfigError(f"{where}: layer_types must be a list of strings, got {hf_types!r}")
    if hf_types is None:
        hf_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    hf_types = list(hf_types)
    if len(hf_types) != n_layers:
        raise ConfigError(f"{where}: layer_types has {len(hf_types)} entries but num_hidden_layers={n_layers}")
    unknown = sorted(set(hf_types) - set(_HF_LAYER_TYPES))
    if unknown:
        raise ConfigError(f"{where}: unknown layer_types {unknown}")
    hf_types[-1] = "full_attention"  # transformers forces the last layer to full attention
    types = tuple(_HF_LAYER_TYPES[t] for t in hf_types)

    head_dim, kv_heads = _get(c, "head_dim", int, where), _get(c, "num_key_value_heads", int, where)
    k_eq_v = _get(c, "attention_k_eq_v", bool, where)
    if "per_layer_config" in c:  # the form save_pretrained writes
        try:
            overrides = {int(k): dict(v) for k, v in c["per_layer_config"].items()}
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(f"{where}: per_layer_config must map layer indices to objects") from None
        if not set(overrides) <= set(range(n_layers)):
            raise ConfigError(f"{where}: per_layer_config names layers {sorted(set(overrides) - set(range(n_layers)))}"
                              f" outside [0, {n_layers})")
        full_over = [overrides.get(i, {}) for i, t in enumerate(types) if t == FULL]
        for i, t in enumerate(types):
            if t == SLIDING and overrides.get(i):
                raise ConfigError(f"{where}: per_layer_config overrides sliding layer {i}; not supported")
        if any(o != full_over[0] for o in full_over):
            raise ConfigError(f"{where}: per_layer_config differs between full-attention layers; not supported")
        bad = set(full_over[0]) - {"head_dim", "num_key_value_heads"}
        if bad:
            raise ConfigError(f"{where}: per_layer_config field(s) {sorted(bad)} not supported")
        global_head_dim = _get(full_over[0], "head_dim", int, f"{where}: per_layer_config", head_dim)
        global_kv = _get(full_over[0], "num_key_value_heads", int, f"{where}: per_layer_config", kv_heads)
    else:  # the form of the released config.json files
        global_head_dim = _get(c, "global_head_dim", int, where, 512)
        nkv = c.get("num_global_key_value_heads")
        global_kv = _get(c, "num_global_key_value_heads", int, where) if (k_eq_v and nkv is not None) else kv_heads

    rope = c.get("rope_parameters") or _DEFAULT_ROPE
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {rope!r}")
    for t in ("sliding_attention", "full_attention"):
        if t not in rope:
            raise ConfigError(f"{where}: rope_parameters has no entry for {t!r}")

    # The unified decoder has no PLE and no MoE code: transformers ignores such fields there, and so do we.
    unified = model_type == "gemma4_unified_text"
    moe = _get(c, "enable_moe_block", bool, where, False) and not unified
    ple = 0 if unified else _get(c, "hidden_size_per_layer_input", int, where, 0)
    softcap = _get(c, "final_logit_softcapping", float, where) if c.get("final_logit_softcapping") is not None else None
    num = functools.partial(_get, c, kind=int, where=where)
    cfg = Config(
        vocab_size=num("vocab_size"),
        hidden_size=num("hidden_size"),
        intermediate_size=num("intermediate_size"),
        num_heads=num("num_attention_heads"),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_kv_heads=global_kv,
        layer_types=types,
        sliding_window=num("sliding_window"),
        rope_sliding=_rope(rope["sliding_attention"], "sliding_attention", where),
        rope_full=_rope(rope["full_attention"], "full_attention", where),
        rms_norm_eps=_get(c, "rms_norm_eps", float, where),
        final_logit_softcapping=softcap or None,
        num_kv_shared_layers=num("num_kv_shared_layers", default=0),
        k_eq_v=k_eq_v,
        double_wide_mlp=_get(c, "use_double_wide_mlp", bool, where, False),
        ple_dim=ple,
        ple_vocab_size=num("vocab_size_per_layer_input", default=0) if ple else 0,
        num_experts=num("num_experts") if moe else 0,
        top_k_experts=num("top_k_experts") if moe else 0,
        moe_intermediate_size=num("moe_intermediate_size") if moe else 0,
        max_position_embeddings=num("max_position_embeddings", default=131072),
    )
    return cfg.validate(where)


def read_json(path: str) -> dict[str, Any]:
    """A JSON object file (config.json, generation_config.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_config(path: str) -> Config:
    """Config of a target checkpoint directory (or a config.json path)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    raw = read_json(path)
    try:
        model_type, text = text_config_dict(raw, path)
        return from_hf_text(text, model_type, path)
    except KeyError as e:
        raise ConfigError(f"{path}: missing field {e.args[0]!r}") from None
