"""Bad arguments to `generate` fail up front, before anything is compiled, with a ValueError that
names the argument and the offending value."""

import json
import shutil
import time

import numpy as np
import pytest

import gemma4_jax
import hf_models
from gemma4_jax.generate import Proposer, generate

VOCAB = hf_models.BASE["vocab_size"]
MAX_POS = 64


@pytest.fixture(scope="module")
def short_model(hf_target, tmp_path_factory):
    """The tiny e2b target with max_position_embeddings=64."""
    path = tmp_path_factory.mktemp("e2b_short")
    shutil.copytree(hf_target("e2b")[1], path, dirs_exist_ok=True)
    with open(path / "config.json") as f:
        raw = json.load(f)
    raw["max_position_embeddings"] = MAX_POS
    with open(path / "config.json", "w") as f:
        json.dump(raw, f)
    model = gemma4_jax.load(str(path), dtype="float32")
    assert model.config.max_position_embeddings == MAX_POS
    return model


@pytest.fixture(scope="module")
def e2b_drafter(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2b_drafter")
    hf_models.assistant("e2b").save_pretrained(path)
    return gemma4_jax.load(str(path), dtype="float32")


def fails(model, prompts, *needles: str, **kwargs) -> str:
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError) as info:
        generate(model, prompts, **kwargs)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"
    return msg


@pytest.mark.parametrize("bad", [-1, VOCAB, VOCAB + 1000])
def test_token_id_outside_vocabulary_is_named(bad, loaded):
    fails(loaded("e2b"), [[1, 2, 3], [4, bad, 5]], "prompt 1", f"token id {bad}", f"[0, {VOCAB})")


def test_empty_prompt_is_named(loaded):
    fails(loaded("e2b"), [[1, 2, 3], []], "prompt 1 is empty")


def test_empty_prompt_list_is_rejected(loaded):
    fails(loaded("e2b"), [], "prompts is empty")


@pytest.mark.parametrize("bad", [0, -3])
def test_max_new_tokens_below_one_is_rejected(bad, loaded):
    fails(loaded("e2b"), [[1, 2, 3]], "max_new_tokens", repr(bad), max_new_tokens=bad)


def test_generation_past_max_position_embeddings_is_rejected(short_model):
    fails(short_model, [[1] * 10, [2] * (MAX_POS - 3)], f"prompt length {MAX_POS - 3}", "max_new_tokens 4",
          f"max_position_embeddings={MAX_POS}", max_new_tokens=4)
    fails(short_model, [[1] * 10], "max_new_tokens 64", f"max_position_embeddings={MAX_POS}",
          max_new_tokens=MAX_POS)


def test_generation_up_to_max_position_embeddings_is_allowed(short_model):
    out = generate(short_model, [[1] * (MAX_POS - 4)], max_new_tokens=4, stop_tokens=())
    assert len(out.tokens[0]) == 4


@pytest.mark.parametrize("bad", [-0.5, -1e-9, float("nan")])
def test_negative_temperature_is_rejected(bad, loaded):
    fails(loaded("e2b"), [[1, 2, 3]], "temperature", temperature=bad)


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5])
def test_top_p_outside_unit_interval_is_rejected(bad, loaded):
    fails(loaded("e2b"), [[1, 2, 3]], "top_p", "(0, 1]", str(bad), temperature=1.0, top_p=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_top_k_below_one_is_rejected(bad, loaded):
    fails(loaded("e2b"), [[1, 2, 3]], "top_k", str(bad), temperature=1.0, top_k=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_num_draft_tokens_below_one_is_rejected(bad, loaded, e2b_drafter):
    target = loaded("e2b")
    fails(target, [[1, 2, 3]], "num_draft_tokens", str(bad), drafter=e2b_drafter, num_draft_tokens=bad)
    proposer = Proposer(fn=lambda *a: None, params=None)
    fails(target, [[1, 2, 3]], "num_draft_tokens", str(bad), drafter=proposer, num_draft_tokens=bad)


@pytest.mark.parametrize("bad", [1e-40, 1e-6])
def test_temperature_too_small_to_sample_is_rejected(bad, loaded):
    """logits / 1e-40 overflows float32: the probabilities would be NaN and every token <pad>."""
    fails(loaded("e2b"), [[2, 5]], "temperature", "greedy", temperature=bad)


def test_drafter_given_as_the_model_is_rejected(e2b_drafter):
    fails(e2b_drafter, [[2, 5]], "not a target model", "drafter")


def test_target_given_as_the_drafter_is_rejected(loaded):
    fails(loaded("e2b"), [[2, 5]], "not a drafter", "target model", drafter=loaded("e2b"))


@pytest.mark.parametrize("bad", [2**64, -2**63 - 1, 1.5])
def test_seed_outside_int64_is_rejected(bad, loaded):
    fails(loaded("e2b"), [[2, 5]], "seed", seed=bad)


def test_num_draft_tokens_beyond_the_limit_is_rejected(loaded, e2b_drafter):
    fails(loaded("e2b"), [[2, 5]], "num_draft_tokens", "64", drafter=e2b_drafter, num_draft_tokens=2_000_000_000)


@pytest.mark.parametrize("bad", [0, -1])
def test_stream_chunk_steps_below_one_is_rejected(bad, loaded):
    from gemma4_jax.generate import Stream

    with pytest.raises(ValueError, match="chunk_steps"):
        Stream(loaded("e2b"), [[2, 5]], max_new_tokens=4, chunk_steps=bad)


def test_the_drafters_num_assistant_tokens_beats_the_per_width_default(loaded, e2b_drafter, monkeypatch):
    """A drafter trained for K drafts says so in its generation_config; a width table must not override it."""
    from gemma4_jax import generate as gen

    m = loaded("e2b")
    monkeypatch.setitem(gen.DEFAULT_DRAFT_TOKENS, m.config.hidden_size, 2)
    assert e2b_drafter.generation_config["num_assistant_tokens"] == 4
    out = generate(m, [[2, 5]], drafter=e2b_drafter, max_new_tokens=4)
    assert len(out.stats["accept_histogram"]) == 4 + 1


@pytest.mark.parametrize("bad", [-1, 0.5, 100])
def test_a_drafters_bad_num_assistant_tokens_is_named(bad, loaded, e2b_drafter):
    import dataclasses

    d = dataclasses.replace(e2b_drafter, generation_config={**e2b_drafter.generation_config,
                                                            "num_assistant_tokens": bad})
    fails(loaded("e2b"), [[2, 5]], "num_assistant_tokens", repr(bad), drafter=d)


def test_numpy_scalar_temperatures_are_plain_numbers():
    from gemma4_jax.sampling import Warp

    assert Warp(np.float32(0)).greedy
    with pytest.raises(ValueError, match="temperature"):
        Warp(np.float32(-1))


def test_compile_time_is_reported_apart_from_generation(loaded):
    import jax

    m = loaded("e2b")
    jax.clear_caches()
    start = time.time()
    first = generate(m, [[2, 5, 7]], max_new_tokens=6, stop_tokens=[])
    wall = time.time() - start
    again = generate(m, [[2, 5, 7]], max_new_tokens=6, stop_tokens=[])
    assert first.tokens == again.tokens
    assert first.stats["compile_seconds"] > 0 and again.stats["compile_seconds"] == 0
    assert first.stats["seconds"] > 0
    assert first.stats["seconds"] + first.stats["compile_seconds"] <= wall
    assert first.stats["tokens_per_second"] == pytest.approx(6 / first.stats["seconds"])
