"""The MTP drafter: one draft step vs transformers 5.23.0 on explicit inputs, its sliding window,
loading, compatibility with the target, and broken drafter checkpoints / configs.

The reference is `Gemma4AssistantForCausalLM(inputs_embeds, position_ids, shared_kv_states)` with
the target's K/V in HF layout [B, Nkv, T, D]; we hand `drafter.step` the same K/V as views
(k [B, S, K, H], v, slot positions [B, S]).
"""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoint_edits import edit_config, edit_tensors
import gemma4_jax
import hf_models
from gemma4_jax import CheckpointError, ConfigError, drafter
from gemma4_jax.config import FULL, SLIDING
from gemma4_jax.generate import generate

W = hf_models.DRAFTER_BASE["sliding_window"]
DT = hf_models.BASE["hidden_size"]
HF_KIND = {SLIDING: "sliding_attention", FULL: "full_attention"}


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    """Tiny HF drafters saved once per module: (target, ordered, extra config) -> (torch model, dir)."""
    cache = {}

    def get(target: str, ordered: bool = True, **over):
        key = (target, ordered, repr(sorted(over.items())))
        if key not in cache:
            model = hf_models.assistant(target, ordered=ordered, **over)
            path = tmp_path_factory.mktemp(f"drafter_{target}_{int(ordered)}")
            model.save_pretrained(path)
            cache[key] = (model, str(path))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def ours(drafters):
    """Our float32 Drafter loaded from the saved checkpoint."""
    cache = {}

    def get(target: str, ordered: bool = True, **over):
        key = (target, ordered, repr(sorted(over.items())))
        if key not in cache:
            cache[key] = gemma4_jax.load(drafters(target, ordered, **over)[1], dtype="float32")
        return cache[key]

    return get


def random_inputs(tcfg, B: int, T: int, seed: int = 0):
    """x [B, 1, 2*Dt] and per kind target K/V [B, Nkv, T, D] (numpy float32), shaped like the
    target's K/V-producing layers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 1, 2 * tcfg.hidden_size)).astype(np.float32)
    kvs = {}
    for kind, layer in tcfg.kv_layers.items():
        spec = tcfg.layers[layer]
        shape = (B, spec.num_kv_heads, T, spec.head_dim)
        kvs[kind] = (rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32))
    return x, kvs


def views_of(kvs, T: int):
    """Our view format of HF-layout K/V: slot s holds position s."""
    B = next(iter(kvs.values()))[0].shape[0]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return {kind: (jnp.asarray(k.transpose(0, 2, 1, 3)), jnp.asarray(v.transpose(0, 2, 1, 3)), pos)
            for kind, (k, v) in kvs.items()}


@torch.no_grad()
def reference(model, x, kvs, T: int):
    """HF logits and carry, one row at a time (with ordered embeddings the reference fills the
    unselected tokens with a minimum over the whole batch; ours is per row)."""
    logits, carry = [], []
    for b in range(x.shape[0]):
        shared = {HF_KIND[kind]: (torch.tensor(k[b:b + 1]), torch.tensor(v[b:b + 1])) for kind, (k, v) in kvs.items()}
        out = model(inputs_embeds=torch.tensor(x[b:b + 1]), position_ids=torch.tensor([[T]]), shared_kv_states=shared)
        logits.append(out.logits.float().numpy())
        carry.append(out.last_hidden_state.float().numpy())
    return np.concatenate(logits), np.concatenate(carry)


def step(d, x, views, T: int):
    B = x.shape[0]
    logits, carry = drafter.step(d.params, d.config, jnp.asarray(x), jnp.full((B,), T, jnp.int32), views)
    return np.asarray(logits), np.asarray(carry)


# --- one draft step vs transformers ------------------------------------------------------------------

@pytest.mark.parametrize("target", ["e2b", "moe"])
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "tied"])
@pytest.mark.parametrize("T", [5, W + 1, W + 2, 3 * W + 5])  # shorter than, at, and past the window
def test_draft_step_matches_transformers(target, ordered, T, drafters, ours, loaded):
    model, _ = drafters(target, ordered)
    d = ours(target, ordered)
    x, kvs = random_inputs(loaded(target).config, 2, T, seed=T)
    ref_logits, ref_carry = reference(model, x, kvs, T)
    logits, carry = step(d, x, views_of(kvs, T), T)
    assert logits.dtype == np.float32 and logits.shape == ref_logits.shape == (2, 1, 512)
    assert carry.shape == ref_carry.shape == (2, 1, DT)
    assert np.abs(logits - ref_logits).max() <= 1e-4
    assert np.abs(carry - ref_carry).max() <= 1e-4
    if ordered:  # only top_k * V/C tokens get real logits; the rest share one fill value per row
        top_k, per_centroid = 4, 512 // 16
        for row in logits[:, 0]:
            assert (row > row.min()).sum() == top_k * per_centroid
            assert np.isclose(row.min(), row[row > row.min()].min() - 1.0, atol=1e-5)


@pytest.mark.parametrize("target", ["e2b", "moe"])
def test_sliding_layers_see_exactly_the_last_window_plus_one_keys(target, drafters, ours, loaded):
    """The reference's flipped mask shows sliding layers the last W+1 target keys: a change at index
    T-1-W changes the draft, one at T-2-W does not, in transformers and in ours alike; full layers see
    every key."""
    model, _ = drafters(target, False)
    d = ours(target, False)
    T = 3 * W + 5
    x, kvs = random_inputs(loaded(target).config, 1, T, seed=1)
    base_ref, _ = reference(model, x, kvs, T)
    base, _ = step(d, x, views_of(kvs, T), T)

    def perturbed(kind, index):
        new = {kd: (k.copy(), v.copy()) for kd, (k, v) in kvs.items()}
        new[kind][0][:, :, index] += 3.0
        new[kind][1][:, :, index] -= 3.0
        ref, _ = reference(model, x, new, T)
        got, _ = step(d, x, views_of(new, T), T)
        assert np.abs(got - ref).max() <= 1e-4
        return np.abs(ref - base_ref).max(), np.abs(got - base).max()

    ref_change, our_change = perturbed(SLIDING, T - 1 - W)
    assert ref_change > 1e-3 and our_change > 1e-3  # oldest visible key
    ref_change, our_change = perturbed(SLIDING, T - 2 - W)
    assert ref_change <= 1e-6 and our_change <= 1e-6  # just outside the window
    ref_change, our_change = perturbed(FULL, 0)
    assert ref_change > 1e-3 and our_change > 1e-3  # full layers: every key


def test_draft_step_ignores_slot_order_empty_and_future_slots(ours, loaded):
    """Views come from our cache: a ring buffer (any slot order), empty slots (position -1) and slots
    at or past the draft position (rolled-back tokens) must not change the step."""
    d = ours("moe", True)
    T, extra = 2 * W + 3, 5
    x, kvs = random_inputs(loaded("moe").config, 2, T, seed=2)
    clean = step(d, x, views_of(kvs, T), T)
    rng = np.random.default_rng(3)
    pos = np.concatenate([np.arange(T), [-1, -1, T, T + 1, T + 7]])
    views = {}
    for kind, (k, v) in kvs.items():
        B, K, _, H = k.shape
        junk = lambda: 50.0 * rng.standard_normal((B, K, extra, H)).astype(np.float32)  # noqa: E731
        k_all, v_all = np.concatenate([k, junk()], axis=2), np.concatenate([v, junk()], axis=2)
        perm = np.stack([rng.permutation(T + extra) for _ in range(B)])  # a different order per row
        k_all = np.take_along_axis(k_all, perm[:, None, :, None], axis=2)
        v_all = np.take_along_axis(v_all, perm[:, None, :, None], axis=2)
        views[kind] = (jnp.asarray(k_all.transpose(0, 2, 1, 3)), jnp.asarray(v_all.transpose(0, 2, 1, 3)),
                       jnp.asarray(pos[perm], jnp.int32))
    messy = step(d, x, views, T)
    for a, b in zip(clean, messy):
        assert np.abs(a - b).max() <= 1e-5


# --- loading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_drafter_loads_as_drafter_with_its_config(dtype, drafters):
    model, path = drafters("e2b", True)
    d = gemma4_jax.load(path, dtype=dtype)
    assert isinstance(d, gemma4_jax.Drafter)
    cfg = d.config
    assert cfg.backbone_hidden_size == DT
    assert (cfg.ordered_embeddings, cfg.num_centroids, cfg.centroid_top_k) == (True, 16, 4)
    assert cfg.text.hidden_size == 32 and cfg.text.vocab_size == 512 and cfg.text.sliding_window == W
    assert cfg.text.layer_types == (SLIDING, SLIDING, SLIDING, FULL)
    assert cfg.text.num_kv_shared_layers == cfg.text.num_layers == 4
    assert cfg.text.final_logit_softcapping is None
    assert d.generation_config.get("num_assistant_tokens") == 4
    assert d.params["embed"].dtype == jnp.dtype(dtype)
    assert d.params["centroids"].shape == (32, 16)
    # The permutation is an index table: int32 whatever the parameter dtype (bf16 cannot hold 511).
    ordering = d.params["ordering"]
    assert ordering.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ordering), model.masked_embedding.token_ordering.numpy())


@pytest.mark.parametrize("ordering", ["repeats", "out_of_range", "float"])
def test_token_ordering_that_is_not_a_permutation_is_refused(ordering, drafters, tmp_path):
    """A bad ordering would make the centroid head gather (and JAX silently clamp) wrong tokens."""
    path = str(tmp_path / "d")
    shutil.copytree(drafters("e2b", True)[1], path)
    key = "masked_embedding.token_ordering"

    def fn(t):
        v = t[key]
        t[key] = {"repeats": np.zeros_like(v), "out_of_range": v + 10**6, "float": v.astype(np.float32)}[ordering]

    edit_tensors(path, fn)
    with pytest.raises(CheckpointError, match=key):
        gemma4_jax.load(path, dtype="float32")


def test_tied_drafter_loads_without_centroids(drafters):
    d = gemma4_jax.load(drafters("moe", False)[1], dtype="float32")
    assert isinstance(d, gemma4_jax.Drafter)
    assert not d.config.ordered_embeddings
    assert d.params["centroids"] is None and d.params["ordering"] is None
    assert d.config.text.num_kv_heads == 2 and d.config.text.num_global_kv_heads == 1


# --- compatibility with the target --------------------------------------------------------------------

def generate_fails(target, d, *needles: str):
    with pytest.raises(ValueError) as info:
        generate(target, [[1, 2, 3]], drafter=d, max_new_tokens=4)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"


def test_drafter_of_another_target_kv_heads_is_rejected(ours, loaded):
    # e2b drafter: one sliding KV head; the moe target has two.
    generate_fails(loaded("moe"), ours("e2b", False), "num_key_value_heads=1", "=2")


def test_drafter_of_another_target_global_kv_heads_is_rejected(ours, loaded):
    # e4b drafter: two KV heads on full layers too; the moe target's k_eq_v full layers have one.
    generate_fails(loaded("moe"), ours("e4b", False), "num_global_key_value_heads=2", "=1")


def test_drafter_of_a_wider_target_is_rejected(ours, tmp_path):
    model = hf_models.causal_lm("e2b", hidden_size=96)
    model.save_pretrained(tmp_path)
    wide = gemma4_jax.load(str(tmp_path), dtype="float32")
    generate_fails(wide, ours("e2b", True), "backbone_hidden_size=64", "hidden_size=96")


@pytest.mark.parametrize("over, needles", [
    (dict(head_dim=32), ("head_dim=32", "head_dim=16")),
    (dict(vocab_size=256), ("vocab_size=256", "vocab_size=512")),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
                           "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                              "partial_rotary_factor": 0.25}}), ("rope_parameters",)),
], ids=["head_dim", "vocab", "rope"])
def test_drafter_with_mismatching_field_is_rejected(over, needles, ours, loaded):
    generate_fails(loaded("e2b"), ours("e2b", False, **over), *needles)


def test_drafter_of_the_same_kind_of_target_is_accepted(ours, hf_target):
    """moe and dense targets share attention shapes: the moe drafter fits the dense target."""
    drafter.check_compatible(ours("moe", True).config, gemma4_jax.load_config(hf_target("dense")[1]))


# --- broken drafter checkpoints and configs -----------------------------------------------------------

@pytest.fixture
def drafter_copy(drafters, tmp_path):
    def get(target: str = "e2b", ordered: bool = True) -> str:
        dst = tmp_path / "drafter"
        shutil.copytree(drafters(target, ordered)[1], dst)
        return str(dst)

    return get


def load_fails(path: str, error, *needles: str) -> str:
    with pytest.raises(error) as info:
        gemma4_jax.load(path, dtype="float32")
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"
    return msg


@pytest.mark.parametrize("name", ["pre_projection.weight", "post_projection.weight",
                                  "masked_embedding.centroids.weight", "masked_embedding.token_ordering",
                                  "model.layers.3.self_attn.q_proj.weight"])
def test_missing_drafter_tensor_error_names_the_tensor(name, drafter_copy):
    path = drafter_copy("e2b", True)
    edit_tensors(path, lambda t: t.pop(name))
    load_fails(path, CheckpointError, "missing tensor", name)


@pytest.mark.parametrize("name, shape", [
    ("pre_projection.weight", (32, 64)),  # a drafter for a target of width 32
    ("post_projection.weight", (64, 16)),
    ("model.layers.3.self_attn.q_proj.weight", (64, 32)),  # sliding shape on the full layer
    ("masked_embedding.centroids.weight", (32, 32)),
    ("masked_embedding.token_ordering", (256,)),
])
def test_wrong_drafter_tensor_shape_error_names_the_tensor(name, shape, drafter_copy):
    path = drafter_copy("e2b", True)
    rng = np.random.default_rng(0)
    edit_tensors(path, lambda t: t.update({name: rng.standard_normal(shape).astype(t[name].dtype)}))
    load_fails(path, CheckpointError, name, str(list(shape)))


@pytest.mark.parametrize("name, shape", [
    ("masked_embedding.centroids.weight", (16, 32)),  # centroids in a drafter configured without them
    ("model.embed_tokens_per_layer.weight", (512, 64)),  # drafters have no per-layer embeddings
    ("model.layers.4.self_attn.q_proj.weight", (64, 32)),  # a fifth layer in a 4-layer drafter
])
def test_unexpected_drafter_tensor_error_names_the_tensor(name, shape, drafter_copy):
    path = drafter_copy("moe", False)
    edit_tensors(path, lambda t: t.update({name: np.zeros(shape, np.float32)}))
    load_fails(path, CheckpointError, "unknown tensor", name)


@pytest.mark.parametrize("field, value", [
    ("hidden_size_per_layer_input", 16), ("enable_moe_block", True), ("use_double_wide_mlp", True)])
def test_drafter_config_with_unsupported_text_field_is_a_config_error(field, value, drafter_copy):
    path = drafter_copy("e2b", False)
    edit_config(path, lambda raw: raw["text_config"].update({field: value}))
    load_fails(path, ConfigError, f"text_config.{field}", "config.json")


def test_drafter_config_whose_centroids_do_not_divide_the_vocabulary_is_a_config_error(drafter_copy):
    path = drafter_copy("e2b", True)
    edit_config(path, lambda raw: raw.update(num_centroids=15))
    load_fails(path, ConfigError, "num_centroids=15", "vocab_size=512")


def test_drafter_config_without_text_config_is_a_config_error(drafter_copy):
    path = drafter_copy("e2b", False)
    edit_config(path, lambda raw: raw.pop("text_config"))
    load_fails(path, ConfigError, "text_config")
