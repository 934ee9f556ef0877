"""Bad arguments to `generate` fail up front, before anything is compiled, with a ValueError that
names the argument and the offending value."""

import json
import shutil

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
