"""Incremental decoding (prefill, 1-token and multi-token steps, rollback) equals the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import cache as kv
from gemma4_jax import model

BLOCK = 4  # largest block that may be rolled back: the sliding ring holds W + BLOCK slots


@functools.partial(jax.jit, static_argnums=1)
def _step(params, cfg, tokens, cache, num_new):
    hidden, cache = model.forward(params, cfg, tokens, cache, num_new)
    return model.logits(params, cfg, hidden), cache


@functools.partial(jax.jit, static_argnums=1)
def _full(params, cfg, tokens):
    return model.logits(params, cfg, model.forward(params, cfg, tokens)[0])


def _run_schedule(m, prompt_lens, schedule, seed=0):
    """Feeds each row its prompt, then the schedule's blocks; returns per-row committed tokens and
    the logits recorded for every committed position. schedule: list of (block width, per-row
    num_new, per-row rollback after the block)."""
    cfg, params = m.config, m.params
    rng = np.random.default_rng(seed)
    B = len(prompt_lens)
    cache = kv.init(cfg, B, 96, block=BLOCK, dtype=m.dtype)
    seqs = [list(rng.integers(0, cfg.vocab_size, n)) for n in prompt_lens]
    recs = [[None] * n for n in prompt_lens]
    width = max(prompt_lens)
    toks = np.zeros((B, width), np.int32)
    for b, s in enumerate(seqs):
        toks[b, : len(s)] = s
    logits, cache = _step(params, cfg, jnp.asarray(toks), cache, jnp.asarray(prompt_lens, jnp.int32))
    for b, n in enumerate(prompt_lens):
        recs[b][:n] = list(np.asarray(logits[b, :n]))
    for width, num_new, back in schedule:
        toks = rng.integers(0, cfg.vocab_size, (B, width)).astype(np.int32)
        logits, cache = _step(params, cfg, jnp.asarray(toks), cache, jnp.asarray(num_new, jnp.int32))
        cache = kv.rollback(cache, jnp.asarray(back, jnp.int32))
        for b in range(B):
            keep = num_new[b] - back[b]
            seqs[b] += list(toks[b, :keep])
            recs[b] += list(np.asarray(logits[b, :keep]))
    assert list(np.asarray(cache.length)) == [len(s) for s in seqs]
    return seqs, recs


def _check_against_full(m, seqs, recs):
    width = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), width), np.int32)
    for b, s in enumerate(seqs):
        toks[b, : len(s)] = s
    full = np.asarray(_full(m.params, m.config, jnp.asarray(toks)))
    for b, s in enumerate(seqs):
        got = np.stack(recs[b])
        np.testing.assert_allclose(got, full[b, : len(s)], atol=1e-4, rtol=0)  # fp32 summation-order noise is ~2e-5


@pytest.mark.parametrize("name", ["e2b", "moe", "dense"])
def test_single_token_steps_after_ragged_prefill_equal_full_forward(name, loaded):
    m = loaded(name)
    W = m.config.sliding_window
    steps = 5 * W  # the sliding ring (W + BLOCK slots) wraps several times
    schedule = [(1, [1, 1, 1], [0, 0, 0])] * steps
    seqs, recs = _run_schedule(m, [3, 2 * W + 1, W], schedule)
    _check_against_full(m, seqs, recs)


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_multi_token_blocks_with_rollback_equal_full_forward(name, loaded):
    """Verify-like blocks of BLOCK tokens, each row keeping a different number and rolling back the
    rest; the next block re-feeds different tokens at the rolled-back positions. Rows also advance
    by different amounts (some write fewer tokens than the block width)."""
    m = loaded(name)
    rng = np.random.default_rng(1)
    schedule = []
    for _ in range(24):
        num_new = [BLOCK, BLOCK, int(rng.integers(1, BLOCK + 1))]
        back = [int(rng.integers(0, n + 1)) for n in num_new]
        schedule.append((BLOCK, num_new, back))
        schedule.append((1, [1, 1, 1], [0, 0, 0]))
    seqs, recs = _run_schedule(m, [5, 17, 1], schedule, seed=2)
    assert min(len(s) for s in seqs) > 3 * m.config.sliding_window
    _check_against_full(m, seqs, recs)


def test_prefill_longer_than_the_sliding_ring(loaded):
    """A prompt longer than the ring buffer, then steps: the ring keeps only the last slots."""
    m = loaded("e4b")
    W = m.config.sliding_window
    seqs, recs = _run_schedule(m, [4 * W + 3, 2], [(2, [2, 1], [0, 0])] * 6)
    _check_against_full(m, seqs, recs)


def test_sliding_layers_keep_bounded_buffers_and_shared_layers_none(loaded):
    m = loaded("e2b")
    cfg = m.config
    c = kv.init(cfg, 2, 96, block=BLOCK, dtype=m.dtype)
    for spec, k in zip(cfg.layers, c.k):
        if not spec.owns_kv:
            assert k is None
        else:
            assert k.shape[1] == (cfg.sliding_window + BLOCK if spec.kind == "sliding" else 96)
