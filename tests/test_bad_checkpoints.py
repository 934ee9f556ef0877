"""Broken checkpoints fail with our error type and a message naming the culprit (file, tensor or field);
valid variations (shards, Google's unused K/V tensors on KV-shared layers) load to the same logits.

Each test copies a tiny saved checkpoint into tmp_path and breaks the copy.
"""

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

from checkpoint_edits import WEIGHTS, edit_config, edit_tensors, read_tensors, write_tensors
import gemma4_jax
from conftest import prompts
from gemma4_jax import CheckpointError, ConfigError

INDEX = "model.safetensors.index.json"


@pytest.fixture
def copy_of(hf_target, tmp_path):
    """A fresh, writable copy of a saved tiny checkpoint directory."""

    def get(name: str = "e2b", kind: str = "causal") -> str:
        dst = tmp_path / f"{name}_{kind}"
        shutil.copytree(hf_target(name, kind)[1], dst)
        return str(dst)

    return get


def load_fails(path: str, error, *needles: str, dtype="float32") -> str:
    """Asserts that loading `path` raises `error` whose message contains every needle."""
    with pytest.raises(error) as info:
        gemma4_jax.load(path, dtype=dtype)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"
    return msg


def shard(path: str, tensors: dict[str, np.ndarray]) -> list[str]:
    """Rewrites `path` as a two-shard checkpoint with an index, the layout save_pretrained uses for
    large models. Returns the shard file names."""
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for file, keys in zip(files, halves):
        write_tensors(path, {k: tensors[k] for k in keys}, file)
        weight_map.update({k: file for k in keys})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    os.remove(os.path.join(path, WEIGHTS))
    return files


TOKENS = prompts(2, 21)


# --- tensors -----------------------------------------------------------------------------------------

def test_missing_tensor_error_names_the_tensor(copy_of):
    path = copy_of("e2b")
    tensors = read_tensors(path)
    del tensors["model.layers.3.self_attn.q_proj.weight"]
    write_tensors(path, tensors)
    load_fails(path, CheckpointError, "missing tensor", "model.layers.3.self_attn.q_proj.weight")


def test_missing_tensors_error_counts_the_rest(copy_of):
    path = copy_of("e2b")
    tensors = read_tensors(path)
    gone = [k for k in tensors if ".mlp.up_proj." in k]
    for k in gone:
        del tensors[k]
    write_tensors(path, tensors)
    msg = load_fails(path, CheckpointError, "missing tensor", "mlp.up_proj.weight")
    assert f"and {len(gone) - 1} more" in msg


def test_missing_moe_tensor_error_names_the_tensor(copy_of):
    path = copy_of("moe")
    tensors = read_tensors(path)
    del tensors["model.layers.4.experts.down_proj"]
    write_tensors(path, tensors)
    load_fails(path, CheckpointError, "model.layers.4.experts.down_proj")


@pytest.mark.parametrize("name, key, shape", [
    ("e2b", "model.layers.1.mlp.up_proj.weight", (127, 64)),
    ("e2b", "model.layers.2.self_attn.q_proj.weight", (64, 64)),  # sliding shape on a full layer
    ("e2b", "model.embed_tokens_per_layer.weight", (512, 16, 6)),  # right size, wrong rank
    ("moe", "model.layers.0.experts.gate_up_proj", (8, 32, 64)),
])
def test_wrong_shape_error_names_tensor_and_both_shapes(copy_of, name, key, shape):
    path = copy_of(name)
    tensors = read_tensors(path)
    expected = list(tensors[key].shape)
    tensors[key] = np.zeros(shape, tensors[key].dtype)
    write_tensors(path, tensors)
    load_fails(path, CheckpointError, repr(key), str(list(shape)), str(expected))


@pytest.mark.parametrize("name, key", [
    ("e2b", "model.layers.0.self_attn.extra_proj.weight"),
    ("e2b", "model.layers.6.input_layernorm.weight"),  # a layer the config does not have
    ("e2b", "model.vision_tower.patch_embedder.input_proj.weight"),  # tower tensor in a text-only checkpoint
    ("e2b", "encoder.weight"),  # outside the model prefix
    ("moe", "model.layers.2.self_attn.v_proj.weight"),  # k_eq_v full layers have no v_proj
])
def test_unknown_tensor_error_names_the_tensor(copy_of, name, key):
    path = copy_of(name)
    tensors = read_tensors(path)
    tensors[key] = np.zeros((4, 64), np.float32)
    write_tensors(path, tensors)
    load_fails(path, CheckpointError, "unknown tensor", repr(key))


def test_unknown_tensor_in_multimodal_checkpoint_is_named(copy_of):
    path = copy_of("e2b", "conditional")
    tensors = read_tensors(path)
    tensors["model.language_model.layers.1.self_attn.bias"] = np.zeros((4,), np.float32)
    write_tensors(path, tensors)
    load_fails(path, CheckpointError, "'model.language_model.layers.1.self_attn.bias'")


def test_kv_shared_layers_unused_kv_tensors_load_and_change_nothing(copy_of, loaded):
    """Google's released files carry k_proj/v_proj/k_norm on KV-shared layers (save_pretrained drops
    them): they load, are ignored, and the logits are bit-identical."""
    path = copy_of("e2b")
    tensors = read_tensors(path)
    cfg = loaded("e2b").config
    rng = np.random.default_rng(0)
    added = 0
    for i, spec in enumerate(cfg.layers):
        if spec.owns_kv:
            continue
        kh, d = spec.num_kv_heads * spec.head_dim, cfg.hidden_size
        for key, shape in (("k_proj.weight", (kh, d)), ("v_proj.weight", (kh, d)),
                           ("k_norm.weight", (spec.head_dim,))):
            tensors[f"model.layers.{i}.self_attn.{key}"] = rng.standard_normal(shape).astype(np.float32)
            added += 1
    assert added == 3 * cfg.num_kv_shared_layers > 0
    write_tensors(path, tensors)
    ours = gemma4_jax.load(path, dtype="float32").logits(TOKENS)
    np.testing.assert_array_equal(ours, loaded("e2b").logits(TOKENS))


# --- files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", ["all_but_100", "half_header", "4_bytes"])
def test_truncated_weights_file_error_names_the_file(copy_of, keep):
    path = copy_of("e2b")
    file = os.path.join(path, WEIGHTS)
    with open(file, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    cut = {"all_but_100": len(data) - 100, "half_header": 8 + header_len // 2, "4_bytes": 4}[keep]
    with open(file, "wb") as f:
        f.write(data[:cut])
    load_fails(path, CheckpointError, file, "truncated")


def test_truncated_file_error_names_the_last_tensor(copy_of):
    """A cut inside the tensor data names the first tensor that no longer fits."""
    path = copy_of("e2b")
    file = os.path.join(path, WEIGHTS)
    with open(file, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    header.pop("__metadata__")
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    with open(file, "wb") as f:
        f.write(data[:-1])
    load_fails(path, CheckpointError, file, repr(last))


@pytest.mark.parametrize("content", [
    b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n",  # LFS pointer
    b"<!DOCTYPE html><html><body>404 Not Found</body></html>" * 4,  # an error page saved as the file
    struct.pack("<Q", 11) + b"\xff\xfe not json",  # a header that is not JSON
    struct.pack("<Q", 5) + b"[1,2]",  # JSON, but not a header object
    struct.pack("<Q", 24) + b'{"w": {"dtype": "F32"}} ',  # a tensor entry without offsets or shape
    b"",
])
def test_not_a_safetensors_file_error_names_the_file(copy_of, content):
    path = copy_of("e2b")
    file = os.path.join(path, WEIGHTS)
    with open(file, "wb") as f:
        f.write(content)
    load_fails(path, CheckpointError, file, "not a safetensors file")


def write_one_tensor_file(path: str, dtype: str, nbytes: int):
    """A weights file holding only model.norm.weight [64] with the given dtype and byte count."""
    header = json.dumps({"model.norm.weight": {"dtype": dtype, "shape": [64], "data_offsets": [0, nbytes]}}).encode()
    with open(os.path.join(path, WEIGHTS), "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(nbytes))


def test_inconsistent_tensor_entry_error_names_the_tensor(copy_of):
    """A header whose byte range does not match the declared shape is caught before reading."""
    path = copy_of("e2b")
    write_one_tensor_file(path, "F32", 128)
    load_fails(path, CheckpointError, "'model.norm.weight'", "[64]")


def test_unsupported_tensor_dtype_error_names_the_tensor(copy_of):
    path = copy_of("e2b")
    write_one_tensor_file(path, "F8_E4M3", 64)
    load_fails(path, CheckpointError, "'model.norm.weight'", "F8_E4M3")


def rewrite_header(path: str, fn) -> str:
    """Rewrites the JSON header of the weights file with fn(header); the data bytes stay as they were."""
    file = os.path.join(path, WEIGHTS)
    with open(file, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return file


@pytest.mark.parametrize("edit", ["negative_offset", "float_offsets", "bool_shape", "list_dtype"])
def test_malformed_header_entry_is_refused_by_name(copy_of, edit):
    """Entries that would read the header's own bytes as weights, or fail deep in numpy."""
    path = copy_of("e2b")

    def fn(h):
        e = h["model.norm.weight"]
        begin, end = e["data_offsets"]
        if edit == "negative_offset":
            e["data_offsets"] = [-16, end - begin - 16]
        elif edit == "float_offsets":
            e["data_offsets"] = [float(begin), float(end)]
        elif edit == "bool_shape":
            e["shape"] = [True] * len(e["shape"])
        else:
            e["dtype"] = [e["dtype"]]

    file = rewrite_header(path, fn)
    load_fails(path, CheckpointError, file, "'model.norm.weight'")


def test_overlapping_tensors_are_refused(copy_of):
    """Two tensors pointing at the same bytes would load one tensor's values as the other's."""
    path = copy_of("e2b")

    def fn(h):
        h["model.norm.weight"]["data_offsets"] = list(h["model.layers.0.input_layernorm.weight"]["data_offsets"])

    file = rewrite_header(path, fn)
    load_fails(path, CheckpointError, file, "overlap")


def test_trailing_bytes_after_the_tensors_are_refused(copy_of):
    path = copy_of("e2b")
    file = os.path.join(path, WEIGHTS)
    with open(file, "ab") as f:
        f.write(bytes(12))
    load_fails(path, CheckpointError, file, "12 bytes after the last tensor")


@pytest.mark.parametrize("dtype, needle", [(np.float16, "float16"), (np.int64, "int64"), (np.bool_, "bool")])
def test_tensor_of_a_wrong_dtype_is_refused_by_name(copy_of, dtype, needle):
    """float16 is not silently re-rounded to bf16, and integers are not cast to weights."""
    path = copy_of("e2b")
    edit_tensors(path, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(dtype)}))
    for dt in ("float32", "bfloat16"):
        load_fails(path, CheckpointError, "'model.norm.weight'", needle, dtype=dt)


def test_directory_without_weights_error_names_the_directory(copy_of):
    path = copy_of("e2b")
    os.remove(os.path.join(path, WEIGHTS))
    load_fails(path, CheckpointError, path, WEIGHTS)


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    load_fails(str(tmp_path / "nowhere"), CheckpointError, "nowhere")


# --- config.json -------------------------------------------------------------------------------------

def test_unknown_model_type_error_names_the_field_and_value(copy_of):
    path = copy_of("e2b")
    edit_config(path, lambda c: c.update(model_type="llama"))
    load_fails(path, ConfigError, "config.json", "model_type", "'llama'")


def test_config_json_not_json_error_names_the_file(copy_of):
    path = copy_of("e2b")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "gemma4_text", "hidden_size": 64,')
    load_fails(path, ConfigError, os.path.join(path, "config.json"), "not valid JSON")


def test_missing_config_json_error_names_the_file(copy_of):
    path = copy_of("e2b")
    os.remove(os.path.join(path, "config.json"))
    load_fails(path, ConfigError, os.path.join(path, "config.json"))


@pytest.mark.parametrize("name, field", [
    ("moe", "num_experts"),
    ("moe", "top_k_experts"),
    ("moe", "moe_intermediate_size"),
    ("e2b", "model_type"),
])
def test_missing_config_field_error_names_the_field(copy_of, name, field):
    path = copy_of(name)
    edit_config(path, lambda c: c.pop(field))
    load_fails(path, ConfigError, "config.json", field)


@pytest.mark.parametrize("field, value, needle", [
    ("hidden_size", "abc", "must be an integer"),
    ("hidden_size", 64.9, "must be an integer"),  # not truncated to 64
    ("num_attention_heads", True, "must be an integer"),
    ("attention_k_eq_v", "false", "must be true or false"),  # a non-empty string is truthy
    ("rms_norm_eps", "tiny", "must be a number"),
    ("sliding_window", None, "is null"),  # not transformers' default of 512
    ("layer_types", 5, "layer_types"),
    ("rope_parameters", {"sliding_attention": "default", "full_attention": {}}, "must be an object"),
    ("rope_parameters", {"sliding_attention": {"rope_theta": "x"}, "full_attention": {"rope_theta": 1.0}},
     "rope_theta"),
    ("max_position_embeddings", 0, "max_position_embeddings"),
])
def test_config_field_of_a_wrong_type_or_null_is_named(copy_of, field, value, needle):
    path = copy_of("e2b")
    edit_config(path, lambda c: c.update({field: value}))
    load_fails(path, ConfigError, "config.json", field, needle)


def test_untied_wrapper_config_is_refused(copy_of):
    """A multimodal wrapper may say tie_word_embeddings=false at its top level; we would drop its lm_head."""
    path = copy_of("e2b", "conditional")
    edit_config(path, lambda c: c.update(tie_word_embeddings=False))
    load_fails(path, ConfigError, "config.json", "tie_word_embeddings")


@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1, 2]", "dir"])
def test_unreadable_json_file_is_named(copy_of, file, content):
    path = copy_of("e2b")
    target = os.path.join(path, file)
    if os.path.exists(target):
        os.remove(target)
    if content == "dir":
        os.mkdir(target)
    else:
        with open(target, "wb") as f:
            f.write(content)
    load_fails(path, ConfigError, file)


def test_wrapper_config_without_text_config_names_the_field(copy_of):
    path = copy_of("e2b", "conditional")
    edit_config(path, lambda c: c.pop("text_config"))
    load_fails(path, ConfigError, "config.json", "text_config")


def test_field_left_to_a_default_that_disagrees_with_the_tensors_is_caught(copy_of):
    """Without hidden_size the config falls back to transformers' default (2304), as transformers
    does; the shape check then names the first tensor that disagrees instead of loading garbage."""
    path = copy_of("e2b")
    edit_config(path, lambda c: c.pop("hidden_size"))
    load_fails(path, CheckpointError, "'model.embed_tokens.weight'", "[512, 64]", "[512, 2304]")


def test_layer_count_disagreeing_with_layer_types_names_both_fields(copy_of):
    path = copy_of("e2b")
    edit_config(path, lambda c: c.update(num_hidden_layers=7))
    load_fails(path, ConfigError, "layer_types", "num_hidden_layers=7")


# --- shards ------------------------------------------------------------------------------------------

def test_sharded_checkpoint_gives_the_same_logits_as_the_single_file(copy_of, loaded):
    path = copy_of("e2b")
    shard(path, read_tensors(path))
    assert not os.path.exists(os.path.join(path, WEIGHTS))
    ours = gemma4_jax.load(path, dtype="float32").logits(TOKENS)
    np.testing.assert_array_equal(ours, loaded("e2b").logits(TOKENS))


def test_missing_shard_error_names_the_shard(copy_of):
    path = copy_of("e2b")
    files = shard(path, read_tensors(path))
    os.remove(os.path.join(path, files[1]))
    load_fails(path, CheckpointError, INDEX, repr(files[1]))


def test_index_listing_a_tensor_absent_from_its_shard_names_tensor_and_shard(copy_of):
    path = copy_of("e2b")
    files = shard(path, read_tensors(path))
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    key = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][key] = files[1]  # it lives in the first shard
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)
    load_fails(path, CheckpointError, INDEX, repr(key), repr(files[1]))


def test_index_listing_a_tensor_in_no_shard_names_the_tensor(copy_of):
    path = copy_of("e2b")
    files = shard(path, read_tensors(path))
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    index["weight_map"]["model.layers.0.ghost.weight"] = files[0]
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)
    load_fails(path, CheckpointError, "'model.layers.0.ghost.weight'")


def test_model_safetensors_wins_over_a_stale_index_as_in_transformers(copy_of, loaded):
    """save_pretrained rewriting a sharded checkpoint as one file leaves the old index and shards."""
    path = copy_of("e2b")
    tensors = read_tensors(path)
    shard(path, {k: v * 2 if k == "model.norm.weight" else v for k, v in tensors.items()})  # stale
    write_tensors(path, tensors)
    ours = gemma4_jax.load(path, dtype="float32").logits(TOKENS)
    np.testing.assert_array_equal(ours, loaded("e2b").logits(TOKENS))


def test_shard_tensor_the_index_does_not_list_is_refused(copy_of):
    path = copy_of("e2b")
    files = shard(path, read_tensors(path))
    tensors = read_tensors(path, files[0])
    tensors["model.layers.0.bogus.weight"] = np.zeros(4, np.float32)
    write_tensors(path, tensors, files[0])
    load_fails(path, CheckpointError, INDEX, "'model.layers.0.bogus.weight'", repr(files[0]), "does not list")


def test_index_naming_a_file_outside_the_directory_is_refused(copy_of):
    path = copy_of("e2b")
    files = shard(path, read_tensors(path))
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    index["weight_map"] = {k: ("../elsewhere/" + v if v == files[0] else v) for k, v in index["weight_map"].items()}
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)
    load_fails(path, CheckpointError, INDEX, "'../elsewhere/" + files[0] + "'")


@pytest.mark.parametrize("content", ['{"weight_map": ', '{"metadata": {}}', '{"weight_map": ["a"]}'])
def test_unreadable_index_error_names_the_index(copy_of, content):
    path = copy_of("e2b")
    shard(path, read_tensors(path))
    with open(os.path.join(path, INDEX), "w") as f:
        f.write(content)
    load_fails(path, CheckpointError, INDEX)


def test_truncated_shard_error_names_the_shard(copy_of):
    path = copy_of("e2b")
    files = shard(path, read_tensors(path))
    file = os.path.join(path, files[0])
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[:-10])
    load_fails(path, CheckpointError, file, "truncated")


# --- load options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", np.float16, "int8"])
def test_unsupported_dtype_request_is_refused_by_name(hf_target, dtype):
    name = np.dtype(dtype).name
    msg = load_fails(hf_target("e2b")[1], ValueError, repr(name), dtype=dtype)
    assert re.search(r"float32.*bfloat16", msg)
