"""Our logits vs transformers 5.23.0 on tiny random models saved in HF format."""

import copy

import numpy as np
import pytest
import torch

import gemma4_jax
import hf_models
from conftest import prompts

VARIANTS = ["e2b", "e4b", "moe", "dense"]
LENGTH = 3 * hf_models.BASE["sliding_window"] + 13  # well past the sliding window


@pytest.mark.parametrize("name", VARIANTS)
def test_float32_logits_match_transformers(name, hf_target, loaded):
    model, _ = hf_target(name)
    tokens = prompts(2, LENGTH)
    ref = hf_models.reference_logits(model, tokens)
    ours = loaded(name).logits(tokens)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


def test_conditional_generation_checkpoint_gives_causal_lm_logits(hf_target):
    """A Gemma4ForConditionalGeneration checkpoint (vision and audio towers present) loads its text
    decoder and gives the reference's text logits."""
    model, path = hf_target("e2b", "conditional")
    tokens = prompts(2, LENGTH)
    ours = gemma4_jax.load(path, dtype="float32").logits(tokens)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens), use_cache=False).logits.float().numpy()
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_bfloat16_is_as_accurate_as_transformers_bfloat16(name, hf_target, loaded):
    """bf16 against the fp32 truth: our error is no larger than the reference's own bf16 error.

    Random tiny models amplify rounding: transformers' bf16 argmax agrees with its own fp32 argmax
    on only 70-90% of positions (measured), so an absolute "99% argmax" bound cannot hold for any
    bf16 implementation here. We bound against that noise floor instead.
    """
    model, _ = hf_target(name)
    tokens = prompts(4, LENGTH, seed=1)
    truth = hf_models.reference_logits(model, tokens)
    ref16 = hf_models.reference_logits(copy.deepcopy(model).to(torch.bfloat16), tokens)  # keep the shared fp32 model
    ours16 = loaded(name, "bfloat16").logits(tokens)

    ref_err, our_err = np.abs(ref16 - truth).mean(), np.abs(ours16 - truth).mean()
    assert our_err <= 1.25 * ref_err  # measured ratio 0.9-1.05
    assert np.abs(ours16 - ref16).mean() <= 1.25 * ref_err
    ref_agree = (ref16.argmax(-1) == truth.argmax(-1)).mean()
    assert (ours16.argmax(-1) == truth.argmax(-1)).mean() >= ref_agree - 0.05


@pytest.mark.parametrize("kind", ["causal", "conditional"])
def test_unified_text_decoder_matches_transformers(kind, tmp_path):
    """The 12B unified model's text decoder, saved as Gemma4UnifiedForCausalLM or inside the
    multimodal Gemma4UnifiedForConditionalGeneration."""
    model = hf_models.unified(kind)
    model.save_pretrained(tmp_path)
    tokens = prompts(2, LENGTH)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens), use_cache=False).logits.float().numpy()
    ours = gemma4_jax.load(str(tmp_path), dtype="float32").logits(tokens)
    assert np.abs(ours - ref).max() <= 1e-4
