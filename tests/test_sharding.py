"""Sharded == unsharded: the rules of sharding.py on eight fake CPU devices (see conftest.py).

Tiny configs (hf_models.py) have N=4 query heads, K=1 (e2b) or 2 (moe, dense sliding) KV heads,
K=1 on the full layers of moe/dense, V=512, F=128 (256 double-wide), Fe=32, so the meshes below hit
both branches of every rule: 2x4 splits query heads but not KV heads, 4x2 splits both (where K=2),
1x8 replicates heads but splits vocab and MLP, 8x1 is pure data parallelism.
"""

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gemma4_jax
from conftest import prompts
from gemma4_jax import model as model_lib, params as params_lib, sharding

NAMES = ["e2b", "moe", "dense"]
MESHES = [(2, 4), (8, 1), (1, 8), (4, 2)]
BATCH, LENGTH = 8, 21  # the batch divides every data axis; the length crosses the sliding window (8)
# fp32 logits are not bit-stable under regrouping: the unsharded model alone moves by up to 4e-5
# between batch 8 and batch 1 (XLA picks other matmul blockings). Measured sharded-vs-unsharded:
# 4e-6..4e-5. A real sharding bug (a permuted head, a missing all-reduce) is O(0.1-1).
TOL = 1e-4


def mesh_of(data: int, model: int):
    return sharding.make_mesh(data, model, devices=jax.devices()[: data * model])


@pytest.fixture(scope="module")
def sharded(hf_target):
    """Our model loaded straight into the shardings of a (data, model) mesh, once per pair."""
    cache = {}

    def get(name: str, shape: tuple[int, int]):
        if (name, shape) not in cache:
            cache[name, shape] = gemma4_jax.load(hf_target(name)[1], dtype="float32", mesh=mesh_of(*shape))
        return cache[name, shape]

    return get


def local_shape(shape, ps: P, mesh) -> tuple[int, ...]:
    return tuple(n // (mesh.shape[a] if a is not None else 1) for n, a in zip(shape, tuple(ps) + (None,) * len(shape)))


# ---------------------------------------------------------------- the rules themselves


def test_spec_maps_dimensions_that_divide_and_replicates_those_that_do_not():
    m24, m18, m42 = mesh_of(2, 4), mesh_of(1, 8), mesh_of(4, 2)
    assert sharding.spec((64, 4, 16), ("embed", "heads", None), m24) == P(None, "model", None)
    assert sharding.spec((64, 4, 16), ("embed", "heads", None), m18) == P(None, None, None)  # 4 heads, 8 ways
    assert sharding.spec((64, 1, 16), ("embed", "kv_heads", None), m24) == P(None, None, None)  # E2B's one KV head
    assert sharding.spec((64, 2, 16), ("embed", "kv_heads", None), m24) == P(None, None, None)
    assert sharding.spec((64, 2, 16), ("embed", "kv_heads", None), m42) == P(None, "model", None)
    assert sharding.spec((512, 64), ("vocab", "embed"), m18) == P("model", None)
    assert sharding.spec((500, 64), ("vocab", "embed"), m18) == P(None, None)
    assert sharding.spec((8, 64, 32), ("experts", "embed", "expert_mlp"), m24) == P(None, None, "model")
    assert sharding.spec((8, 21), ("batch", None), m24) == P("data", None)
    assert sharding.spec((3, 21), ("batch", None), m24) == P(None, None)
    # A mesh axis shards at most one dimension of a tensor.
    assert sharding.spec((4, 128), ("heads", "mlp"), m24) == P("model", None)


def test_changing_strategy_is_editing_the_rules():
    rules = {**sharding.RULES, "heads": None, "embed": sharding.DATA}
    assert sharding.spec((64, 4, 16), ("embed", "heads", None), mesh_of(2, 4), rules) == P("data", None, None)


def test_spec_rejects_a_logical_axis_without_a_rule():
    with pytest.raises(ValueError, match="'hedas'"):
        sharding.spec((64, 4), ("embed", "hedas"), mesh_of(2, 4))


def test_batch_sharding_splits_rows_over_data_only_when_they_divide():
    mesh = mesh_of(8, 1)
    assert sharding.batch_sharding(mesh, (8, 21)).spec == P("data", None)
    assert sharding.batch_sharding(mesh, (4, 21)).spec == P(None, None)


REAL = os.path.join(os.path.dirname(__file__), "fixtures", "configs")


@pytest.mark.skipif(not os.path.isdir(REAL), reason="no vendored configs")
def test_real_configs_split_everything_but_the_kv_heads_that_do_not_divide():
    """Released shapes on 1x8 (declarations only): q/o, MLP, experts and vocab split 8 ways; KV
    heads split where they divide (31B sliding: 16) and are replicated where not (E2B: 1, 31B full:
    4, 26B full: 2); a device holds less than 1.1x its 1/8 share."""
    mesh = mesh_of(1, 8)
    for name, kv_split in {"gemma-4-E2B-it": {}, "gemma-4-31B-it": {"sliding": True, "full": False},
                           "gemma-4-26B-A4B-it": {"sliding": True, "full": False}}.items():
        cfg = gemma4_jax.load_config(os.path.join(REAL, name + ".json"))
        decl = params_lib.declare(cfg)
        assert sharding.spec(decl["embed"].shape, decl["embed"].axes, mesh) == P("model", None)
        replicated = 0  # bytes of KV weights replicated because their heads do not divide
        for ls, layer in zip(cfg.layers, decl["layers"]):
            a = layer["attn"]
            assert sharding.spec(a["q"].shape, a["q"].axes, mesh) == P(None, "model", None)
            assert sharding.spec(a["o"].shape, a["o"].axes, mesh) == P("model", None, None)
            assert sharding.spec(layer["mlp"]["down"].shape, layer["mlp"]["down"].axes, mesh) == P("model", None)
            if layer["moe"] is not None:
                up = layer["moe"]["up"]
                assert sharding.spec(up.shape, up.axes, mesh) == P(None, None, "model")
            for w in ("k", "v"):
                if a[w] is not None:
                    split = sharding.spec(a[w].shape, a[w].axes, mesh)[1] == "model"
                    assert split == kv_split.get(ls.kind, False), (name, ls.index, w)
                    replicated += 0 if split else 2 * math.prod(a[w].shape)
        leaves = jax.tree.leaves(decl, is_leaf=params_lib.is_param)
        per_device = sum(sharding.shard_bytes(p, mesh, 2) for p in leaves)
        assert replicated < 0.1 * per_device, name
        # Norms, PLE projections, the router and the undividable KV heads: measured 2.6% (31B) to 8.4% (E2B).
        assert per_device <= 1.1 * 2 * params_lib.count(decl) / 8, name


# ---------------------------------------------------------------- loaded parameters


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_loaded_into_the_shardings_the_rules_give(name, shape, sharded):
    m = sharded(name, shape)
    decl = params_lib.declare(m.config)
    leaves = jax.tree_util.tree_leaves_with_path(m.params)
    decls = jax.tree_util.tree_leaves(decl, is_leaf=params_lib.is_param)
    assert len(leaves) == len(decls)
    for (path, x), p in zip(leaves, decls):
        want = sharding.spec(p.shape, p.axes, m.mesh)
        where = jax.tree_util.keystr(path)
        assert x.shape == p.shape, where
        assert x.sharding.is_equivalent_to(NamedSharding(m.mesh, want), x.ndim), (where, x.sharding, want)
        shards = x.addressable_shards
        assert len(shards) == math.prod(shape), where
        assert all(s.data.shape == local_shape(p.shape, want, m.mesh) for s in shards), (where, want)
    # shard_bytes (the benchmark's per-device bytes) counts what device 0 really holds.
    dev0 = m.mesh.devices.flat[0]
    on_device0 = sum(s.data.nbytes for _, x in leaves for s in x.addressable_shards if s.device == dev0)
    assert on_device0 == sum(sharding.shard_bytes(p, m.mesh, 4) for p in decls)


def _split_over_model(x) -> bool:
    return "model" in tuple(x.sharding.spec) and not x.sharding.is_fully_replicated


def test_e2b_single_kv_head_is_replicated_on_purpose_while_query_heads_split(sharded):
    for shape in MESHES:
        layers = sharded("e2b", shape).params["layers"]
        owners = [a for a in (layer["attn"] for layer in layers) if a["k"] is not None]
        assert owners and all(a["k"].sharding.is_fully_replicated for a in owners), shape
        for layer in layers:
            q, o, gate = layer["attn"]["q"], layer["attn"]["o"], layer["mlp"]["gate"]
            assert _split_over_model(q) == (shape[1] in (2, 4)), shape  # N=4: splits 2 and 4 ways, not 8
            assert _split_over_model(o) == (shape[1] in (2, 4)), shape
            assert _split_over_model(gate) == (shape[1] > 1), shape
    ple = sharded("e2b", (1, 8)).params["ple"]["embed"]
    assert ple.sharding.spec[0] == "model" and ple.addressable_shards[0].data.shape == (64, 6, 16)


def test_moe_experts_split_on_their_mlp_dim_and_kv_heads_split_only_where_they_divide(sharded):
    for shape in MESHES:
        for name in ("moe", "dense"):
            params = sharded(name, shape).params
            assert _split_over_model(params["embed"]) == (shape[1] > 1)
            for layer, kind in zip(params["layers"], ["s", "s", "f", "s", "s", "f"]):
                k = layer["attn"]["k"]
                # K=2 on sliding layers splits over model=2 only; the full layers' single KV head never.
                assert _split_over_model(k) == (kind == "s" and shape[1] == 2), (name, shape, kind)
                assert (layer["attn"]["v"] is None) == (kind == "f")  # k_eq_v
                if name == "moe":
                    for w, dim in (("gate", 2), ("up", 2), ("down", 1)):
                        x = layer["moe"][w]
                        assert x.addressable_shards[0].data.shape[dim] == 32 // shape[1], (w, shape)
                        assert x.sharding.spec[0] is None  # experts: not an axis of this mesh


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_sharded_logits_equal_unsharded_logits(name, shape, sharded, loaded):
    tokens = prompts(BATCH, LENGTH, seed=3)
    want = loaded(name).logits(tokens)
    got = sharded(name, shape).logits(tokens)
    assert got.shape == want.shape == (BATCH, LENGTH, 512)
    assert np.abs(got - want).max() <= TOL


# ---------------------------------------------------------------- how XLA partitions the forward


@functools.partial(jax.jit, static_argnums=1)
def _forward_logits(params, cfg, tokens):
    hidden, _ = model_lib.forward(params, cfg, tokens)
    return model_lib.logits(params, cfg, hidden)


COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")

@pytest.mark.parametrize("shape", [(8, 1), (2, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["e2b", "moe", "dense"])
def test_forward_is_data_parallel_and_never_gathers_a_weight(name, shape, sharded):
    """Pure data parallelism needs no collective at all; tensor parallelism (Megatron layout) needs
    all-reduces after the row-parallel matmuls but never an all-gather."""
    m = sharded(name, shape)
    tokens = jax.device_put(jnp.zeros((BATCH, LENGTH), jnp.int32), sharding.batch_sharding(m.mesh, (BATCH, LENGTH)))
    with jax.set_mesh(m.mesh):
        hlo = _forward_logits.lower(m.params, m.config, tokens).compile().as_text()
    ops = {op for op, _ in COLLECTIVE.findall(hlo)}
    assert ops <= (set() if shape[1] == 1 else {"all-reduce"}), ops
