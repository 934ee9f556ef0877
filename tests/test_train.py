"""Training and export: HF-format export round trips (ours and transformers), pretraining lowers the
loss, drafter distillation raises acceptance, and the train-drafter command line.

A purely random target's next token is a random function of its context: no drafter learns it in a
few hundred steps (measured on the tiny E2B-like model: 3% agreement with its argmax after 500 steps
on fresh random sequences; on a fixed set of 64 of its own greedy continuations a drafter reaches
100% on them and accepts nothing on held-out prompts).
So the distillation test first trains the tiny E2B-like target on a synthetic language (what a
user does when fine-tuning), then distils a drafter on the target's own greedy continuations.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

import gemma4_jax
import hf_models
from checkpoint_edits import read_tensors
from gemma4_jax import api, drafter, export, train
from gemma4_jax.generate import generate


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_exported_target_reloads_bit_identically_and_transformers_gives_identical_logits(name, hf_target, loaded,
                                                                                          tmp_path):
    from transformers import Gemma4ForCausalLM

    hf, _ = hf_target(name)
    ours = loaded(name)
    out = export.save(str(tmp_path / "export"), ours)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    back = gemma4_jax.load(out, dtype="float32")
    assert back.config == ours.config
    assert_same_params(back.params, ours.params)

    reloaded = Gemma4ForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(0).integers(0, 512, (2, 19))
    ref = hf_models.reference_logits(hf, tokens)
    np.testing.assert_array_equal(hf_models.reference_logits(reloaded, tokens), ref)
    assert np.abs(back.logits(tokens) - ref).max() <= 1e-4


def test_exported_bfloat16_target_reloads_bit_identically(loaded, tmp_path):
    ours = loaded("e2b", "bfloat16")
    out = export.save(str(tmp_path / "bf16"), ours)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert_same_params(gemma4_jax.load(out, dtype="bfloat16").params, ours.params)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "tied"])
def test_exported_drafter_reloads_bit_identically_and_transformers_gives_identical_logits(ordered, loaded, tmp_path):
    from transformers import Gemma4AssistantForCausalLM

    hf = hf_models.assistant("e2b", ordered=ordered)
    hf.save_pretrained(tmp_path / "hf")
    ours = gemma4_jax.load(str(tmp_path / "hf"), dtype="float32")
    out = export.save(str(tmp_path / "export"), ours)
    back = gemma4_jax.load(out, dtype="float32")
    assert back.config == ours.config
    assert back.generation_config["num_assistant_tokens"] == 4
    assert_same_params(back.params, ours.params)

    hf_models.patch_all_reuse_drafter()
    reloaded = Gemma4AssistantForCausalLM.from_pretrained(out).eval()
    rng = np.random.default_rng(1)
    T, tcfg = 13, loaded("e2b").config
    x = rng.standard_normal((1, 1, 2 * tcfg.hidden_size)).astype(np.float32)
    shared, views = {}, {}
    for kind, layer in tcfg.kv_layers.items():
        spec = tcfg.layers[layer]
        k, v = (rng.standard_normal((1, spec.num_kv_heads, T, spec.head_dim)).astype(np.float32) for _ in "kv")
        shared[{"sliding": "sliding_attention", "full": "full_attention"}[kind]] = (torch.tensor(k), torch.tensor(v))
        views[kind] = (jnp.asarray(k.transpose(0, 2, 1, 3)), jnp.asarray(v.transpose(0, 2, 1, 3)),
                       jnp.arange(T, dtype=jnp.int32)[None])
    with torch.no_grad():
        args = dict(inputs_embeds=torch.tensor(x), position_ids=torch.tensor([[T]]), shared_kv_states=shared)
        ref, got = hf(**args), reloaded(**args)
    for (name, a), (name_ref, b) in zip(sorted(reloaded.state_dict().items()), sorted(hf.state_dict().items())):
        assert name == name_ref and torch.equal(a, b), name  # the same tensors, bit for bit
    # (the same weights in differently laid out storage may differ in the last bit of a matmul)
    np.testing.assert_allclose(got.logits.numpy(), ref.logits.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.last_hidden_state.numpy(), ref.last_hidden_state.numpy(), rtol=0, atol=1e-6)
    logits, carry = drafter.step(back.params, back.config, jnp.asarray(x), jnp.array([T], jnp.int32), views)
    assert np.abs(np.asarray(logits) - ref.logits.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(carry) - ref.last_hidden_state.numpy()).max() <= 1e-4


def test_interrupted_export_leaves_nothing_and_existing_exports_are_kept(loaded, tmp_path, monkeypatch):
    ours = loaded("e2b")
    dest = tmp_path / "model"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        export.save(str(dest), ours)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # neither the destination nor a partial directory

    export.save(str(dest), ours)
    with pytest.raises(FileExistsError, match="already exists"):
        export.save(str(dest), ours)
    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        export.save(str(dest), ours, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model"]
    assert_same_params(gemma4_jax.load(str(dest), dtype="float32").params, ours.params)  # the old one, intact


def test_export_permissions_follow_the_umask(loaded, tmp_path):
    """mkdtemp makes owner-only directories; an exported checkpoint must be readable like any file."""
    old = os.umask(0o022)
    try:
        out = export.save(str(tmp_path / "model"), loaded("e2b"))
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o755
    for name in os.listdir(out):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644, name


def test_overwrite_replaces_only_a_checkpoint_directory(loaded, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint directory"):
        export.save(str(other), loaded("e2b"), overwrite=True)
    assert os.listdir(other) == ["notes.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    with pytest.raises(FileExistsError, match="not a checkpoint directory"):
        export.save(str(a_file), loaded("e2b"), overwrite=True)
    assert a_file.read_text() == "keep me too"


def test_progress_of_a_run_that_saved_nothing_does_not_block_another_command(tmp_path):
    train.Checkpoints(str(tmp_path / "p"), 2, {"batch_size": 16})  # e.g. out of memory before step 2
    train.Checkpoints(str(tmp_path / "p"), 2, {"batch_size": 8})  # the smaller retry is not refused


def test_overwrite_that_fails_at_the_swap_puts_the_old_checkpoint_back(loaded, tmp_path, monkeypatch):
    ours = loaded("e2b")
    dest = tmp_path / "model"
    export.save(str(dest), ours)
    real_rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new directory into place
            raise OSError("disk went away")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="disk went away"):
        export.save(str(dest), ours, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model"]
    assert_same_params(gemma4_jax.load(str(dest), dtype="float32").params, ours.params)


# --- pretraining ----------------------------------------------------------------------------------

VOCAB = np.random.default_rng(7).choice(np.arange(3, 512), 64, replace=False)  # the language's tokens
SUCCESSOR = dict(zip(VOCAB.tolist(), np.random.default_rng(8).permutation(VOCAB).tolist()))


def language(seed: int, batch: int, length: int, noise: float = 0.1) -> np.ndarray:
    """A low-entropy synthetic language: each token is followed by its fixed successor, or (with
    probability `noise`) by a random token of the language."""
    rng = np.random.default_rng(seed)
    out = np.empty((batch, length), np.int32)
    out[:, 0] = rng.choice(VOCAB, batch)
    for t in range(1, length):
        follow = np.array([SUCCESSOR[x] for x in out[:, t - 1].tolist()])
        out[:, t] = np.where(rng.random(batch) < noise, rng.choice(VOCAB, batch), follow)
    return out


@pytest.fixture(scope="module")
def trained_target(loaded):
    """The tiny E2B-like target (random HF weights) trained 30 steps on the language."""
    m = loaded("e2b")
    batches = [language(seed, 16, 32) for seed in range(30)]
    params = train.pretrain(m.config, batches, steps=30, lr=1e-2, params=m.params)
    return dataclasses.replace(m, params=params)


def test_pretraining_lowers_the_loss(loaded, trained_target):
    held_out = jnp.asarray(language(1000, 32, 32))
    loss = jax.jit(train.lm_loss, static_argnums=1)
    before = float(loss(loaded("e2b").params, loaded("e2b").config, held_out))
    after = float(loss(trained_target.params, trained_target.config, held_out))
    assert before > 5.5  # about log(512): the random model knows nothing
    assert after < 1.5  # the language's entropy is about 0.1 * log(64) + 0.33 ~ 0.75 nats
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trained_target.params))


def test_training_batches_with_ids_outside_the_vocabulary_are_rejected(loaded):
    m = loaded("e2b")
    with pytest.raises(ValueError, match="token id 512 outside the vocabulary"):
        train.pretrain(m.config, [np.full((2, 8), 512)], steps=1, params=m.params)
    dcfg = train.drafter_config_for(m.config, hidden_size=16, num_layers=1)
    with pytest.raises(ValueError, match="token id -1 outside"):
        train.distill(m.params, m.config, dcfg, [np.full((2, 8), -1)], steps=1)


# --- distillation ---------------------------------------------------------------------------------

def test_drafter_forward_at_many_positions_equals_one_step_per_position(loaded):
    """Training runs every round of a sequence in one drafter pass; each row must be the draft step
    that inference runs at that position (its own mask, RoPE position and sliding window)."""
    m = loaded("e2b")
    dcfg = train.drafter_config_for(m.config, hidden_size=32, num_layers=2)
    dparams = train.init_drafter(dcfg, 0)
    rng = np.random.default_rng(0)
    views = {}
    for kind, layer in m.config.kv_layers.items():  # K/V shaped like the target's, slot s at position s
        spec = m.config.layers[layer]
        k, v = (jnp.asarray(rng.standard_normal((2, 21, spec.num_kv_heads, spec.head_dim)), jnp.float32) for _ in "kv")
        views[kind] = (k, v, jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (2, 21)))
    x = jnp.asarray(rng.standard_normal((2, 21, 2 * m.config.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (2, 21))
    logits, carry = jax.jit(drafter.forward, static_argnums=1)(dparams, dcfg, x, pos, views)
    step = jax.jit(drafter.step, static_argnums=1)
    for t in (1, 5, 9, 10, 20):  # before, at and past the sliding window (8)
        one, c = step(dparams, dcfg, x[:, t:t + 1], pos[:, t], views)
        np.testing.assert_allclose(np.asarray(logits[:, t]), np.asarray(one[:, 0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(carry[:, t]), np.asarray(c[:, 0]), atol=1e-5)


@pytest.mark.parametrize("loss, ordered", [("ce", True), ("kl", False)])
def test_distillation_loss_over_position_chunks_equals_the_whole(loss, ordered, loaded):
    """Chunking (what keeps real vocabularies' [B, T, V] logits out of memory) changes no number:
    loss, metrics and gradients, with T not a multiple of the chunk."""
    m = loaded("e2b")
    dcfg = train.drafter_config_for(m.config, hidden_size=16, num_layers=1, num_centroids=16 if ordered else 0)
    dp = train.init_drafter(dcfg, 0, target_params=m.params)
    frozen, trainable = dp["ordering"], {**dp, "ordering": None}
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 512, (2, 23)), jnp.int32)

    def run(chunk):
        f = lambda p: train.distill_loss({**p, "ordering": frozen}, dcfg, m.params, m.config, tokens,  # noqa: E731
                                         draft_len=3, loss=loss, chunk=chunk)
        return jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)

    (whole, mw), gw = run(23)
    (parts, mp), gp = run(5)
    np.testing.assert_allclose(parts, whole, rtol=1e-5)
    np.testing.assert_array_equal(mp["weight"], mw["weight"])
    np.testing.assert_allclose(mp["agree"], mw["agree"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gw)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _acceptance(target, dcfg, dparams, prompts, k):
    out = generate(target, prompts, drafter=api.Drafter(config=dcfg, params=dparams), max_new_tokens=24,
                   num_draft_tokens=k, stop_tokens=[])
    return out.stats["accepted_drafts"] / (out.stats["verify_steps"] * k), out


def test_distillation_raises_acceptance_well_above_an_untrained_drafter(trained_target):
    target, k = trained_target, 3
    rng = np.random.default_rng(0)
    prompts = [rng.choice(VOCAB, 3).tolist() for _ in range(48)]
    held_out = [rng.choice(VOCAB, 4).tolist() for _ in range(8)]
    seqs = train.sample_sequences(target, prompts, 32)  # the target's own greedy continuations
    dcfg = train.drafter_config_for(target.config, hidden_size=32, num_layers=1)
    history = []
    dparams = train.distill(target.params, target.config, dcfg, [seqs[i:i + 16] for i in range(0, 48, 16)],
                            steps=80, lr=3e-3, draft_len=k, loss="ce",
                            on_step=lambda step, loss, metrics, s: history.append((loss, metrics["agree"])),
                            log_every=20)
    untrained = train.init_drafter(dcfg, 1)
    before, _ = _acceptance(target, dcfg, untrained, held_out, k)
    after, out = _acceptance(target, dcfg, dparams, held_out, k)
    assert before <= 0.1
    assert after >= 0.7 and after >= before + 0.6
    assert out.stats["mean_tokens_per_step"] >= 1 + 0.7 * k
    assert history[-1][0] < history[0][0] and min(history[-1][1]) > 0.7


def test_drafter_config_fits_the_target_and_orders_its_vocabulary_into_equal_clusters(loaded):
    tcfg = loaded("e2b").config
    dcfg = train.drafter_config_for(tcfg, hidden_size=24, num_layers=3, num_centroids=16, centroid_top_k=4)
    drafter.check_compatible(dcfg, tcfg)
    assert dcfg.text.layer_types == ("sliding", "sliding", "full")
    assert dcfg.text.num_kv_shared_layers == 3 and dcfg.backbone_hidden_size == tcfg.hidden_size
    ordering = train.cluster_embeddings(np.asarray(loaded("e2b").params["embed"]), 16)
    assert sorted(ordering.tolist()) == list(range(512))  # a permutation: 16 clusters of 32 tokens
    with pytest.raises(ValueError, match="divide"):
        train.drafter_config_for(tcfg, hidden_size=24, num_centroids=15)


# --- the command line -----------------------------------------------------------------------------

class CharTokenizer:
    """Stands in for the checkpoint's tokenizer: one id per byte, offset past the special ids."""

    bos_id = 2

    def encode(self, text, add_bos=True):
        return ([2] if add_bos else []) + [3 + b % 509 for b in text.encode()]


def test_training_windows_start_with_bos_when_asked():
    ids = np.arange(10, 110, dtype=np.int32)
    batch = next(train.window_batches(ids, 8, 32, seed=0, bos=2))
    assert batch.shape == (32, 8) and (batch[:, 0] == 2).all()
    assert (np.diff(batch[:, 1:], axis=1) == 1).all()  # then the window's other 7 corpus tokens
    assert ((batch[:, 1] - 10) % 8 == 1).all()  # of the non-overlapping 8-token windows
    docs = np.concatenate([[2], np.arange(10, 17), [2], np.arange(20, 27)]).astype(np.int32)
    assert not (np.asarray(next(train.window_batches(docs, 8, 8, seed=0, bos=2)))[:, 1] == 2).any()  # no <bos><bos>
    plain = next(train.window_batches(ids, 8, 4, seed=0))
    assert (np.diff(plain, axis=1) == 1).all()


@pytest.fixture
def fake_tokenizer(monkeypatch):
    from gemma4_jax import tokenizer

    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda directory: CharTokenizer())


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 20)
    return str(path)


def test_train_drafter_cli_writes_a_drafter_that_loads_in_ours_and_transformers(fake_tokenizer, corpus, hf_target,
                                                                                 tmp_path, capsys):
    from transformers import Gemma4AssistantForCausalLM

    _, target_dir = hf_target("e2b")
    out = tmp_path / "drafter"
    code = train.train_drafter_cli(["--target", target_dir, "--data", corpus, "--out", str(out), "--steps", "3",
                                    "--draft-len", "2", "--batch-size", "2", "--seq-len", "16", "--hidden-size",
                                    "16", "--layers", "1", "--centroids", "16", "--log-every", "1"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    d = gemma4_jax.load(str(out), dtype="float32")
    assert isinstance(d, gemma4_jax.Drafter)
    assert d.generation_config["num_assistant_tokens"] == 2
    assert d.config.ordered_embeddings and d.config.num_centroids == 16 and d.config.text.hidden_size == 16
    drafter.check_compatible(d.config, gemma4_jax.load_config(target_dir))
    hf_models.patch_all_reuse_drafter()
    hf = Gemma4AssistantForCausalLM.from_pretrained(str(out))
    np.testing.assert_array_equal(hf.masked_embedding.token_ordering.numpy(), np.asarray(d.params["ordering"]))


@pytest.mark.parametrize("edit, needle", [
    (lambda a: a.update({"--steps": "0"}), "--steps"),
    (lambda a: a.update({"--loss": "mse"}), "--loss"),
    (lambda a: a.update({"--lr": "-1"}), "--lr"),
    (lambda a: a.update({"--draft-len": "x"}), "--draft-len"),
    (lambda a: a.update({"--data": "/nonexistent/file.txt"}), "not found"),
    (lambda a: a.update({"--target": "/nonexistent"}), "not a checkpoint directory"),
    (lambda a: a.update({"--out": "EXISTING"}), "already exists"),
    (lambda a: a.update({"--data": "BINARY"}), "not UTF-8"),
    (lambda a: a.update({"--seq-len": "200000"}), "max_position_embeddings"),
    (lambda a: a.update({"--seq-len": "2000"}), "fewer than --seq-len"),
    (lambda a: a.pop("--out"), "--out"),
    (lambda a: a.update({"--seed": "-1"}), "--seed"),
    (lambda a: a.update({"--centroid-top-k": "4"}), "--centroids"),
    (lambda a: a.update({"--out": "UNWRITABLE"}), "not a writable directory"),
], ids=["steps", "loss", "lr", "draft-len", "data", "target", "out", "binary", "seq-len", "seq-len-data", "no-out",
        "seed", "centroid-top-k", "unwritable-out"])
def test_train_drafter_cli_errors_are_one_line_with_exit_code_2(edit, needle, fake_tokenizer, corpus, hf_target,
                                                                tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    args = {"--target": hf_target("e2b")[1], "--data": corpus, "--out": str(tmp_path / "new"), "--steps": "1"}
    edit(args)
    argv = [str(x) for kv in args.items() for x in kv]
    unwritable = tmp_path / "a_file"
    unwritable.write_text("not a directory")
    argv = [{"EXISTING": str(existing), "BINARY": str(binary), "UNWRITABLE": str(unwritable / "sub")}.get(x, x)
            for x in argv]
    capsys.readouterr()  # drop what building the fixtures printed
    assert train.train_drafter_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["target", "data_dir", "not_a_checkpoint"])
def test_train_drafter_overwrite_never_replaces_the_target_the_data_or_other_files(where, fake_tokenizer, hf_target,
                                                                                  tmp_path, capsys):
    target = tmp_path / "target"
    shutil.copytree(hf_target("e2b")[1], target)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = data_dir / "data.txt"
    data.write_text("def f(x):\n    return x\n" * 100)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    out = {"target": target, "data_dir": data_dir, "not_a_checkpoint": other}[where]
    before = sorted(os.listdir(out))
    argv = ["--target", str(target), "--data", str(data), "--out", str(out), "--overwrite", "--steps", "1"]
    capsys.readouterr()  # drop what building the fixtures printed
    assert train.train_drafter_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err
    assert sorted(os.listdir(out)) == before


def test_train_drafter_cli_with_a_corrupt_tokenizer_is_a_one_line_error(corpus, hf_target, tmp_path, capsys):
    target = tmp_path / "target"
    shutil.copytree(hf_target("e2b")[1], target)
    (target / "tokenizer.model").write_bytes(b"garbage")
    argv = ["--target", str(target), "--data", corpus, "--out", str(tmp_path / "new")]
    capsys.readouterr()  # drop what building the fixtures printed
    assert train.train_drafter_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer" in err and not (tmp_path / "new").exists()


def test_training_with_zero_steps_is_a_clear_error(loaded):
    batches = iter([np.zeros((2, 9), np.int32)])
    with pytest.raises(ValueError, match="steps"):
        train.pretrain(loaded("e2b").config, batches, steps=0)


def test_interrupted_train_drafter_resumes_and_ends_as_an_uninterrupted_run(fake_tokenizer, corpus, hf_target,
                                                                            tmp_path, monkeypatch, capsys):
    base = ["--target", hf_target("e2b")[1], "--data", corpus, "--steps", "6", "--draft-len", "2", "--batch-size", "2",
            "--seq-len", "16", "--hidden-size", "16", "--layers", "1", "--checkpoint-every", "2"]
    straight, resumed, progress = tmp_path / "straight", tmp_path / "resumed", tmp_path / ".resumed.train"
    assert train.train_drafter_cli(base + ["--out", str(straight)]) == 0
    real = train.window_batches

    def interrupted(*args, **kwargs):  # Ctrl-C while step 5 waits for its batch
        batches = real(*args, **kwargs)
        for i, batch in enumerate(batches):
            if i == 5:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train, "window_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train_drafter_cli(base + ["--out", str(resumed)])
    monkeypatch.setattr(train, "window_batches", real)
    assert not resumed.exists() and progress.is_dir()  # no output that looks complete; the progress is kept

    capsys.readouterr()
    assert train.train_drafter_cli([x if x != "6" else "7" for x in base] + ["--out", str(resumed)]) == 2
    assert "steps" in capsys.readouterr().err  # another run's progress is not resumed
    assert train.train_drafter_cli(base + ["--out", str(resumed)]) == 0
    assert "resuming from step 4 of 6" in capsys.readouterr().err
    assert not progress.exists()
    a, b = read_tensors(str(straight)), read_tensors(str(resumed))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_drafter_cli_without_a_tokenizer_in_the_target_is_a_one_line_error(corpus, hf_target, tmp_path, capsys):
    argv = ["--target", hf_target("e2b")[1], "--data", corpus, "--out", str(tmp_path / "new")]
    capsys.readouterr()  # drop what building the fixtures printed
    assert train.train_drafter_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer" in err
