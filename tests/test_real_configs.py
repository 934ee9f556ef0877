"""The released Gemma 4 configurations, under `jax.eval_shape` only (no weights are allocated).

Fixtures are config.json files written from published values (tests/fixtures/configs/SOURCES.md).
Expected layouts and parameter counts are derived here from the published dimensions, by formula,
independently of gemma4_jax's own config / params code.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import load_config, params
from gemma4_jax.config import FULL, SLIDING

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")
V = 262144

# Published text-decoder dimensions (spec §8.1): D hidden, L layers, period of the full-attention
# layer, N heads, K / Kf sliding / full KV heads, F mlp width, shared trailing KV-shared layers, P PLE.
DIMS = {
    "gemma-4-E2B-it": dict(D=1536, L=35, period=5, N=8, K=1, Kf=1, k_eq_v=False, F=6144, double_wide=True,
                           shared=20, P=256),
    "gemma-4-E4B-it": dict(D=2560, L=42, period=6, N=8, K=2, Kf=2, k_eq_v=False, F=10240, double_wide=False,
                           shared=18, P=256),
    "gemma-4-26B-A4B-it": dict(D=2816, L=30, period=6, N=16, K=8, Kf=2, k_eq_v=True, F=2112, double_wide=False,
                               shared=0, P=0, E=128, top_k=8, Fe=704),
    "gemma-4-31B-it": dict(D=5376, L=60, period=6, N=32, K=16, Kf=4, k_eq_v=True, F=21504, double_wide=False,
                           shared=0, P=0),
    "gemma-4-12B-it": dict(D=3840, L=48, period=6, N=16, K=8, Kf=1, k_eq_v=True, F=15360, double_wide=False,
                           shared=0, P=0),
}
TARGETS = list(DIMS)
HS, HF = 256, 512  # sliding / full head dims of every release


def analytic_count(d: dict) -> int:
    """Text-decoder parameters from the published dimensions (tied LM head counted once)."""
    D, L, N, P = d["D"], d["L"], d["N"], d["P"]
    first_shared = L - d["shared"]
    total = V * D + D  # embedding, final norm
    if P:
        total += V * L * P + D * L * P + P  # PLE table, model projection, projection norm
    for i in range(L):
        full = (i + 1) % d["period"] == 0
        H, K = (HF, d["Kf"]) if full else (HS, d["K"])
        shared = i >= first_shared
        total += 4 * D + 1  # four norms, layer_scalar
        total += 2 * D * N * H + H  # q, o, q_norm
        if not shared:
            with_v = not (full and d["k_eq_v"])
            total += D * K * H * (2 if with_v else 1) + H  # k (+ v), k_norm
        total += 3 * D * d["F"] * (2 if shared and d["double_wide"] else 1)
        if P:
            total += 2 * D * P + D  # per-layer gate, projection, norm
        if "E" in d:
            E, Fe = d["E"], d["Fe"]
            total += D * E + D + E + 3 * E * D * Fe + 3 * D  # router, scales, experts, three extra norms
    return total


@functools.lru_cache(maxsize=None)
def config(name: str):
    return load_config(os.path.join(FIXTURES, name + ".json"))


@functools.lru_cache(maxsize=None)
def abstract_params(name: str):
    """The initialiser traced at full size: shapes and dtypes only."""
    decl = params.declare(config(name))
    return jax.eval_shape(functools.partial(params.init, decl, dtype=jnp.bfloat16), jax.random.key(0))


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def raw(name: str) -> dict:
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", TARGETS)
def test_real_config_builds_abstract_params_without_allocation(name):
    shapes = abstract_params(name)
    leaves = jax.tree.leaves(shapes)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert n_params(shapes) == params.count(params.declare(config(name)))


@pytest.mark.parametrize("name", TARGETS)
def test_layer_plan_has_published_layer_types_head_dims_and_kv_heads(name):
    d, cfg = DIMS[name], config(name)
    assert cfg.num_layers == d["L"]
    full = [i for i in range(d["L"]) if (i + 1) % d["period"] == 0]
    assert [i for i, s in enumerate(cfg.layers) if s.kind == FULL] == full
    assert full[-1] == d["L"] - 1
    for s in cfg.layers:
        if s.kind == SLIDING:
            assert (s.head_dim, s.num_kv_heads) == (HS, d["K"])
        else:
            assert (s.head_dim, s.num_kv_heads) == (HF, d["Kf"])


@pytest.mark.parametrize("name, first_shared, store, width, wide", [
    ("gemma-4-E2B-it", 15, {SLIDING: 13, FULL: 14}, 6144, 12288),
    ("gemma-4-E4B-it", 24, {SLIDING: 22, FULL: 23}, 10240, 10240),
])
def test_kv_shared_layers_read_the_store_layers_and_have_no_kv_params(name, first_shared, store, width, wide):
    cfg, shapes = config(name), abstract_params(name)
    assert cfg.first_shared_layer == first_shared
    assert cfg.kv_layers == store
    for i, (spec, layer) in enumerate(zip(cfg.layers, shapes["layers"])):
        attn = layer["attn"]
        if i < first_shared:
            assert spec.owns_kv and attn["k"] is not None and attn["v"] is not None
            assert spec.mlp_width == width and layer["mlp"]["gate"].shape == (cfg.hidden_size, width)
        else:
            assert spec.kv_source == store[spec.kind]
            assert attn["k"] is None and attn["v"] is None and attn["k_norm"] is None
            assert spec.mlp_width == wide and layer["mlp"]["down"].shape == (wide, cfg.hidden_size)
    # Store layers are the last producer of their kind before the shared suffix.
    assert cfg.layers[store[SLIDING]].kind == SLIDING and cfg.layers[store[FULL]].kind == FULL


@pytest.mark.parametrize("name, store", [
    ("gemma-4-26B-A4B-it", {SLIDING: 28, FULL: 29}),
    ("gemma-4-31B-it", {SLIDING: 58, FULL: 59}),
    ("gemma-4-12B-it", {SLIDING: 46, FULL: 47}),
])
def test_non_sharing_models_compute_kv_everywhere_and_expose_last_layers_for_the_drafter(name, store):
    cfg = config(name)
    assert cfg.num_kv_shared_layers == 0 and all(s.owns_kv for s in cfg.layers)
    assert cfg.kv_layers == store  # spec §6: the drafter reads the last sliding and last full layer


@pytest.mark.parametrize("name", ["gemma-4-26B-A4B-it", "gemma-4-31B-it", "gemma-4-12B-it"])
def test_k_eq_v_full_layers_have_no_v_param(name):
    d, cfg, shapes = DIMS[name], config(name), abstract_params(name)
    assert cfg.k_eq_v
    for spec, layer in zip(cfg.layers, shapes["layers"]):
        attn = layer["attn"]
        if spec.kind == FULL:
            assert not spec.has_v and attn["v"] is None
            assert attn["k"].shape == (d["D"], d["Kf"], HF)
        else:
            assert attn["v"].shape == attn["k"].shape == (d["D"], d["K"], HS)


def test_26b_has_128_experts_top_8_beside_a_dense_mlp():
    cfg, shapes = config("gemma-4-26B-A4B-it"), abstract_params("gemma-4-26B-A4B-it")
    assert (cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size) == (128, 8, 704)
    for layer in shapes["layers"]:
        moe = layer["moe"]
        assert moe["router"].shape == (2816, 128)
        assert moe["gate"].shape == moe["up"].shape == (128, 2816, 704)
        assert moe["down"].shape == (128, 704, 2816)
        assert layer["mlp"]["gate"].shape == (2816, 2112)


def test_models_without_ple_have_no_ple_params_and_e_models_do():
    for name in TARGETS:
        has_ple = DIMS[name]["P"] > 0
        shapes = abstract_params(name)
        assert (shapes["ple"] is not None) == has_ple
        if has_ple:
            assert shapes["ple"]["embed"].shape == (V, DIMS[name]["L"], 256)


@pytest.mark.parametrize("name", TARGETS)
def test_parameter_count_equals_the_analytic_count_from_published_dimensions(name):
    # Exact: both count the same tensors. The 31B check spelled out: embedding + final norm, then
    # 50 sliding layers (q,k,v,o at 32/16/16/32 heads of 256) and 10 full layers (q,k,o at 32/4/32
    # heads of 512, no v), each with a 3 x 5376 x 21504 MLP, four norms and layer_scalar.
    if name == "gemma-4-31B-it":
        D, F = 5376, 21504
        sliding = 4 * D + 1 + D * (32 + 16 + 16 + 32) * 256 + 2 * 256 + 3 * D * F
        full = 4 * D + 1 + D * (32 + 4 + 32) * 512 + 2 * 512 + 3 * D * F
        assert analytic_count(DIMS[name]) == V * D + D + 50 * sliding + 10 * full == 30_697_345_340
    assert n_params(abstract_params(name)) == analytic_count(DIMS[name])


# Published figures (Google's announcements/model cards) and the tolerance each is met with. The
# first number is the rounding of the published figure; E4B is the exception (see benchmarks/SIZES.md).
def _effective(name):
    shapes = abstract_params(name)
    return n_params(shapes) - (n_params(shapes["ple"]["embed"]) if shapes["ple"] is not None else 0)


def _active(name):
    cfg, shapes = config(name), abstract_params(name)
    experts = sum(n_params([l["moe"][k] for k in ("gate", "up", "down")]) for l in shapes["layers"])
    return n_params(shapes) - experts + experts * cfg.top_k_experts // cfg.num_experts


@pytest.mark.parametrize("name, measure, published, tol", [
    ("gemma-4-E2B-it", _effective, 2.3e9, 0.05e9),  # 2.280B
    ("gemma-4-E4B-it", _effective, 4.5e9, 0.15e9),  # 4.644B: 3% above; not explained by the towers
    ("gemma-4-26B-A4B-it", lambda n: n_params(abstract_params(n)), 25.2e9, 0.05e9),  # 25.233B text only
    ("gemma-4-26B-A4B-it", _active, 3.8e9, 0.05e9),  # 3.823B
    ("gemma-4-31B-it", lambda n: n_params(abstract_params(n)), 30.7e9, 0.05e9),  # 30.697B text only
])
def test_counts_agree_with_published_figures(name, measure, published, tol):
    assert abs(measure(name) - published) <= tol


@pytest.mark.parametrize("name, published_total", [
    ("gemma-4-E2B-it", 5.1e9), ("gemma-4-E4B-it", 8.0e9), ("gemma-4-26B-A4B-it", None),
    ("gemma-4-31B-it", None), ("gemma-4-12B-it", None),
])
def test_transformers_builds_the_same_text_decoder_from_the_fixture(name, published_total):
    """transformers' own model from the same fixture (meta device): identical text-decoder count up to
    layer_scalar, which HF keeps as a buffer; with its vision/audio towers the E models reach their
    published totals."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = os.path.join(FIXTURES, name + ".json")
    with torch.device("meta"):
        model = getattr(transformers, raw(name)["architectures"][0])(transformers.AutoConfig.from_pretrained(path))
    text = sum(p.numel() for k, p in model.named_parameters() if k.startswith("model.language_model."))
    assert text + DIMS[name]["L"] == n_params(abstract_params(name))
    if published_total:
        assert abs(sum(p.numel() for p in model.parameters()) - published_total) <= 0.1e9


# Drafters (spec §8.2 / §4.1): not parsed by gemma4_jax yet; checked as JSON against their targets.
DRAFTERS = {"gemma-4-E2B-it": 78.0e6, "gemma-4-E4B-it": 78.8e6, "gemma-4-26B-A4B-it": 0.4e9,
            "gemma-4-31B-it": 0.5e9}


@pytest.mark.parametrize("target", list(DRAFTERS))
def test_drafter_fixture_is_valid_for_transformers_and_compatible_with_its_target(target):
    a = raw(target + "-assistant")
    t, tt = a["text_config"], raw(target)["text_config"]
    cfg = config(target)
    assert a["model_type"] == "gemma4_assistant" and a["backbone_hidden_size"] == cfg.hidden_size
    # transformers' validate_architecture (§4.1)
    assert t["vocab_size_per_layer_input"] == 0 and t["hidden_size_per_layer_input"] == 0
    assert not t["enable_moe_block"] and not t["use_double_wide_mlp"]
    assert t["num_kv_shared_layers"] == t["num_hidden_layers"] == 4
    assert t["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    # It attends over the target's K/V: same head dims, KV heads per kind, RoPE and vocabulary.
    assert (t["head_dim"], t["global_head_dim"]) == (cfg.head_dim, cfg.global_head_dim)
    assert t["num_key_value_heads"] == cfg.num_kv_heads
    full_kv = t["num_global_key_value_heads"] if t["attention_k_eq_v"] and t["num_global_key_value_heads"] \
        else t["num_key_value_heads"]
    assert full_kv == cfg.num_global_kv_heads
    assert t["rope_parameters"] == tt["rope_parameters"] and t["vocab_size"] == cfg.vocab_size
    assert t["final_logit_softcapping"] is None
    assert a["use_ordered_embeddings"] == (cfg.ple_dim > 0)


@pytest.mark.parametrize("target, published", list(DRAFTERS.items()))
def test_drafter_parameter_count_matches_model_card(target, published):
    a = raw(target + "-assistant")
    t, h, Ht = a["text_config"], a["text_config"]["hidden_size"], a["backbone_hidden_size"]
    n = V * h + h + 2 * Ht * h + Ht * h  # tied embedding/head, final norm, pre- and post-projection
    for kind in t["layer_types"]:
        H = t["global_head_dim"] if kind == "full_attention" else t["head_dim"]
        n += 4 * h + 1 + 2 * h * t["num_attention_heads"] * H + H + 3 * h * t["intermediate_size"]
    if a["use_ordered_embeddings"]:
        n += a["num_centroids"] * h
    # "78M" / "78.8M": within 0.5%; "~0.4B" / "~0.5B": within the rounding.
    assert abs(n - published) <= (0.005 * published if published < 1e8 else 0.05e9)
