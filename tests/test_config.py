"""config.json -> Config: both serialised forms agree, transformers' defaults are reproduced, and what
we do not support is refused with a ConfigError naming the field."""

import json

import jax
import jax.numpy as jnp
import pytest

import hf_models
from gemma4_jax import ConfigError, load_config
from gemma4_jax.config import FULL, SLIDING

S, F = "sliding_attention", "full_attention"


def parse(tmp_path, raw: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return load_config(str(path))


def saved_form(name: str, **over) -> dict:
    """What save_pretrained writes for a tiny model: full-layer overrides in `per_layer_config`."""
    raw = hf_models.text_config(name, **over).to_dict()
    assert "per_layer_config" in raw and "global_head_dim" not in raw
    return raw


def released_form(name: str, **over) -> dict:
    """The same model as Google's released config.json files write it: `global_head_dim` and
    `num_global_key_value_heads` instead of `per_layer_config`."""
    raw = {**hf_models.BASE, **hf_models.TARGETS[name], "model_type": "gemma4_text", **over}
    raw.pop("initializer_range")
    return raw


def small(**over) -> dict:
    """A minimal hand-written text config; everything else takes transformers' defaults."""
    return {"model_type": "gemma4_text", "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
            "vocab_size": 512, "hidden_size_per_layer_input": 0, **over}


# --- the two serialised forms ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["e2b", "e4b", "moe", "dense"])
def test_per_layer_config_form_equals_released_form(tmp_path, name):
    a = parse(tmp_path, saved_form(name))
    b = parse(tmp_path, released_form(name))
    assert a == b and hash(a) == hash(b)
    assert a.global_head_dim == 32 and a.layers[-1].head_dim == 32 and a.layers[0].head_dim == 16


def test_zero_padded_per_layer_config_keys_are_layer_indices(tmp_path):
    raw = saved_form("moe")
    raw["per_layer_config"] = {f"{int(k):02d}": v for k, v in raw["per_layer_config"].items()}
    assert parse(tmp_path, raw) == parse(tmp_path, saved_form("moe"))


def test_saved_config_json_parses_to_the_model_transformers_built(hf_target):
    """The file save_pretrained wrote, read back: the per-layer plan matches the torch model's modules."""
    model, path = hf_target("e2b")
    cfg = load_config(path)
    for spec, layer in zip(cfg.layers, model.model.layers):
        attn = layer.self_attn
        assert attn.q_proj.weight.shape[0] == cfg.num_heads * spec.head_dim
        assert layer.mlp.up_proj.weight.shape[0] == spec.mlp_width
    assert [s.owns_kv for s in cfg.layers] == [True] * 4 + [False] * 2
    assert cfg.kv_layers == {SLIDING: 3, FULL: 2}


# --- defaults and gating -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 6, 8, 12, 13])
def test_default_layer_types_are_five_sliding_one_full_and_last_full(tmp_path, n):
    from transformers import Gemma4TextConfig

    cfg = parse(tmp_path, small(num_hidden_layers=n))
    want = [FULL if (i + 1) % 6 == 0 or i == n - 1 else SLIDING for i in range(n)]
    assert list(cfg.layer_types) == want
    hf = [FULL if t == F else SLIDING for t in Gemma4TextConfig(num_hidden_layers=n).layer_types]
    assert want == hf


def test_last_layer_is_forced_to_full_attention(tmp_path):
    cfg = parse(tmp_path, small(layer_types=[S, S, F, S, S, S]))
    assert cfg.layer_types == (SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL)


@pytest.mark.parametrize("k_eq_v", [False, True])
def test_num_global_key_value_heads_applies_only_with_attention_k_eq_v(tmp_path, k_eq_v):
    raw = small(attention_k_eq_v=k_eq_v, num_global_key_value_heads=1)
    cfg = parse(tmp_path, raw)
    assert cfg.num_global_kv_heads == (1 if k_eq_v else 2)
    assert cfg.layers[-1].num_kv_heads == cfg.num_global_kv_heads and cfg.layers[0].num_kv_heads == 2
    assert cfg.layers[-1].has_v == (not k_eq_v)
    # transformers applies the same gate when it converts to per_layer_config
    from transformers import Gemma4TextConfig

    hf = {k: v for k, v in raw.items() if k != "model_type"}
    assert parse(tmp_path, Gemma4TextConfig(**hf).to_dict()) == cfg


def test_missing_rope_parameters_take_transformers_defaults(tmp_path):
    cfg = parse(tmp_path, small())
    assert (cfg.rope_sliding.theta, cfg.rope_sliding.fraction) == (10000.0, 1.0)
    assert (cfg.rope_full.theta, cfg.rope_full.fraction) == (1e6, 0.25)


def test_no_softcapping_is_none(tmp_path):
    assert parse(tmp_path, small(final_logit_softcapping=None)).final_logit_softcapping is None
    assert parse(tmp_path, small(final_logit_softcapping=30.0)).final_logit_softcapping == 30.0


def test_bidirectional_vision_is_accepted_for_text_decoding(tmp_path):
    """The 31B and 12B releases set "vision": it only changes masks of image tokens."""
    assert parse(tmp_path, small(use_bidirectional_attention="vision")) == parse(tmp_path, small())


# --- wrappers and model types ------------------------------------------------------------------------

@pytest.mark.parametrize("with_type", [True, False])
def test_gemma4_wrapper_reads_text_config(tmp_path, with_type):
    text = saved_form("e2b")
    if not with_type:
        text.pop("model_type")
    wrapped = {"model_type": "gemma4", "text_config": text, "vision_config": {"hidden_size": 32},
               "image_token_id": 258880}
    assert parse(tmp_path, wrapped) == parse(tmp_path, saved_form("e2b"))


def test_gemma4_wrapper_config_written_by_transformers_parses(hf_target):
    model, path = hf_target("e2b", "conditional")
    assert load_config(path) == load_config(hf_target("e2b")[1])


def test_gemma4_unified_text_has_no_ple_and_no_moe(tmp_path):
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedTextConfig

    kw = dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=512, attention_k_eq_v=True,
              num_global_key_value_heads=1)
    text = Gemma4UnifiedTextConfig(**kw).to_dict()
    cfg = parse(tmp_path, text)
    assert cfg.ple_dim == 0 and not cfg.moe
    assert cfg.sliding_window == 1024 and cfg.max_position_embeddings == 262144  # unified defaults
    assert (cfg.global_head_dim, cfg.num_global_kv_heads) == (32, 1)
    assert parse(tmp_path, Gemma4UnifiedConfig(text_config=text).to_dict()) == cfg
    # hand-written released form, with stray PLE/MoE fields the unified decoder does not have
    stray = {"model_type": "gemma4_unified", "text_config": {
        **kw, "model_type": "gemma4_unified_text", "hidden_size_per_layer_input": 16, "enable_moe_block": True}}
    assert parse(tmp_path, stray) == cfg


# --- refused configs ---------------------------------------------------------------------------------

REFUSED = {
    "activation": (dict(hidden_activation="gelu"), ["hidden_activation", "'gelu'"]),
    "yarn_full": (dict(rope_parameters={S: {"rope_type": "default", "rope_theta": 1e4},
                                        F: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0}}),
                  ["rope_type", "'yarn'", F]),
    "yarn_sliding": (dict(rope_parameters={S: {"rope_type": "yarn", "rope_theta": 1e4},
                                           F: {"rope_type": "default", "rope_theta": 1e6}}),
                     ["rope_type", "'yarn'", S]),
    "rope_without_theta": (dict(rope_parameters={S: {"rope_type": "default"}, F: {"rope_theta": 1e6}}),
                           ["rope_theta"]),
    "rope_flat": (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), ["rope_parameters"]),
    "bidirectional_all": (dict(use_bidirectional_attention="all"), ["use_bidirectional_attention", "'all'"]),
    "no_full_producer": (dict(layer_types=[S, S, F, S, S, F], num_kv_shared_layers=4),
                         ["num_kv_shared_layers=4", "'full'"]),
    "all_shared": (dict(num_kv_shared_layers=6), ["num_kv_shared_layers=6"]),
    "heads_not_multiple": (dict(num_attention_heads=3), ["num_attention_heads=3", "num_key_value_heads=2"]),
    "zero_kv_heads": (dict(num_key_value_heads=0), ["num_key_value_heads=0"]),
    "global_heads_not_multiple": (dict(attention_k_eq_v=True, num_global_key_value_heads=3),
                                  ["num_attention_heads=4", "num_global_key_value_heads=3"]),
    "attention_bias": (dict(attention_bias=True), ["attention_bias"]),
    "untied": (dict(tie_word_embeddings=False), ["tie_word_embeddings"]),
    "layer_count": (dict(layer_types=[S, F]), ["layer_types", "num_hidden_layers=6"]),
    "layer_kind": (dict(layer_types=[S, S, "chunked_attention", S, S, F]), ["layer_types", "chunked_attention"]),
    "moe_without_experts": (dict(enable_moe_block=True), ["num_experts"]),
    "moe_top_k": (dict(enable_moe_block=True, num_experts=4, top_k_experts=8, moe_intermediate_size=8),
                  ["top_k_experts"]),
    "ple_without_vocab": (dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=0),
                          ["vocab_size_per_layer_input"]),
    "per_layer_on_sliding": (dict(per_layer_config={"0": {"head_dim": 32}}), ["per_layer_config", "layer 0"]),
    "per_layer_field": (dict(per_layer_config={"5": {"intermediate_size": 64}}),
                        ["per_layer_config", "intermediate_size"]),
    "per_layer_key": (dict(per_layer_config={"full_attention": {"head_dim": 32}}), ["per_layer_config"]),
    "per_layer_range": (dict(per_layer_config={"9": {"head_dim": 32}}), ["per_layer_config", "9"]),
    "odd_head_dim": (dict(head_dim=15), ["head dim"]),
    "model_type": (dict(model_type="gemma3_text"), ["model_type", "'gemma3_text'"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_config_is_a_config_error_naming_the_field(tmp_path, case):
    over, needles = REFUSED[case]
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, small(**over))
    msg = str(info.value)
    assert str(tmp_path / "config.json") in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_wrapper_without_text_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="text_config"):
        parse(tmp_path, {"model_type": "gemma4", "vision_config": {}})


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)


# --- hashability -------------------------------------------------------------------------------------

def test_config_is_hashable_and_a_jit_static_argument(tmp_path):
    """Equal configs built separately share one compiled function; a different config retraces."""
    traces = []

    def f(x, cfg):
        traces.append(cfg)
        return x * cfg.num_layers + cfg.layers[-1].head_dim

    jf = jax.jit(f, static_argnums=1)
    a, b = parse(tmp_path, saved_form("moe")), parse(tmp_path, released_form("moe"))
    assert a is not b and {a: 1}[b] == 1
    x = jnp.ones(3)
    assert float(jf(x, a)[0]) == 6 + 32
    jf(x, b)
    assert len(traces) == 1
    jf(x, parse(tmp_path, saved_form("dense")))
    assert len(traces) == 2


def test_config_is_frozen(tmp_path):
    cfg = parse(tmp_path, small())
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1
