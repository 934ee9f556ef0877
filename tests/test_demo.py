"""The shipped demo pair: held-out acceptance, lossless speculative output, transformers parity."""

import os

import numpy as np
import pytest
import torch

import gemma4_jax
import hf_models
from gemma4_jax import cli, corpus
from gemma4_jax.generate import generate
from gemma4_jax.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not os.path.isdir(cli.DEMO_DRAFTER), reason="demo pair not installed")
MANIFEST = os.path.join(cli.DEMO_DIR, "corpus_manifest.json")


@pytest.fixture(scope="module")
def pair():
    return gemma4_jax.load(cli.DEMO_TARGET, dtype="float32"), gemma4_jax.load(cli.DEMO_DRAFTER, dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    return corpus.heldout_prompts(load_tokenizer(cli.DEMO_TARGET), MANIFEST, count=24, tokens=64)


def test_shipped_pair_fits_the_size_budget():
    size = sum(os.path.getsize(os.path.join(d, f)) for d in (cli.DEMO_TARGET, cli.DEMO_DRAFTER) for f in os.listdir(d))
    assert size <= 25 * 2**20


def test_heldout_speculative_greedy_is_lossless_and_accepts_drafts(pair, prompts):
    target, drafter = pair
    assert len(prompts) >= 20
    plain = generate(target, prompts, max_new_tokens=48, stop_tokens=[])
    spec = generate(target, prompts, drafter=drafter, max_new_tokens=48, num_draft_tokens=4, stop_tokens=[])
    assert spec.tokens == plain.tokens
    assert spec.stats["mean_tokens_per_step"] >= 2.5


@pytest.fixture(scope="module")
def hf_target():
    from transformers import Gemma4ForCausalLM

    hf = Gemma4ForCausalLM.from_pretrained(cli.DEMO_TARGET, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf


def test_bf16_argmax_matches_the_fp32_reference_on_heldout_text(hf_target, prompts):
    """Issue 2's bf16 criterion, on a trained model (random tiny models are too flat for it, see
    test_parity): our bf16 forward picks transformers' fp32 argmax at >= 99% of held-out positions."""
    bf16 = gemma4_jax.load(cli.DEMO_TARGET, dtype="bfloat16")
    same = []
    for p in prompts:
        with torch.no_grad():
            ref = hf_target(torch.tensor([p])).logits[0].argmax(-1).numpy()
        same.append(bf16.logits(p)[0].argmax(-1) == ref)
    same = np.concatenate(same)
    assert len(same) >= 1000
    assert same.mean() >= 0.99


def test_transformers_loads_the_pair_and_agrees_token_for_token(pair, prompts, hf_target):
    from transformers import Gemma4AssistantForCausalLM

    hf_models.patch_all_reuse_drafter()
    hf = hf_target
    ours = generate(pair[0], prompts, max_new_tokens=32, stop_tokens=[]).tokens
    for p, o in zip(prompts, ours):  # every held-out prompt
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)
        assert ref[0, len(p):].tolist() == o
    assistant = Gemma4AssistantForCausalLM.from_pretrained(cli.DEMO_DRAFTER, dtype=torch.float32).eval()
    assistant.generation_config.num_assistant_tokens = 4
    with torch.no_grad():
        assisted = hf.generate(torch.tensor([prompts[0]]), assistant_model=assistant, max_new_tokens=32,
                               do_sample=False)
    assert assisted[0, len(prompts[0]):].tolist() == ours[0]
