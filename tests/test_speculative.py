"""Speculative decoding: lossless greedy, right telemetry, exact sampling."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gemma4_jax
import hf_models
from gemma4_jax import model, sampling
from gemma4_jax.generate import Proposer, generate

MAX_NEW = 40  # > 4 sliding windows (W = 8) of generated tokens


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [5, 12, 3, 9, 17, 1, 7, 20][:n]
    return [list(map(int, rng.integers(3, 512, k))) for k in lengths]


@pytest.fixture(scope="module")
def drafter(tmp_path_factory):
    cache = {}

    def get(name, ordered=True):
        if (name, ordered) not in cache:
            path = tmp_path_factory.mktemp(f"drafter_{name}_{ordered}")
            hf_models.assistant(name, ordered=ordered).save_pretrained(path)
            cache[name, ordered] = str(path)
        return gemma4_jax.load(cache[name, ordered], dtype="float32")

    return get


@functools.lru_cache(maxsize=None)
def _plain(m, n_prompts, max_new):
    return generate(m, _prompts(n_prompts), max_new_tokens=max_new, stop_tokens=[])


@pytest.mark.parametrize("name", ["e2b", "moe", "dense"])
def test_plain_greedy_equals_transformers_greedy(name, hf_target, loaded):
    hf, _ = hf_target(name)
    ours = _plain(loaded(name), 3, MAX_NEW).tokens
    for row, prompt in enumerate(_prompts(3)):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert ours[row] == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("name,batch,k,ordered", [
    ("e2b", 8, 2, True), ("e2b", 1, 7, True), ("e2b", 3, 4, False),
    ("moe", 3, 4, False), ("moe", 8, 1, True),
    ("dense", 3, 2, True), ("dense", 1, 4, False),
])
def test_speculative_greedy_equals_plain_greedy(name, batch, k, ordered, loaded, drafter):
    m = loaded(name)
    plain = _plain(m, 8, MAX_NEW).tokens  # row i of the batch of 8 == prompt i alone (batch=1 cases)
    spec = generate(m, _prompts(batch), drafter=drafter(name, ordered), max_new_tokens=MAX_NEW,
                    num_draft_tokens=k, stop_tokens=[])
    assert spec.tokens == plain[:batch]
    assert spec.stats["verify_steps"] >= 1


# Proposals injected through the same interface the drafter uses.
@dataclasses.dataclass(frozen=True)
class TableProposals:
    """Proposes table[row, p+1 : p+1+K]: the tokens the table holds for the next K positions."""

    def __call__(self, table, ctx, key, K, warp):
        idx = jnp.minimum(ctx.pos[:, None] + 1 + jnp.arange(K)[None, :], table.shape[1] - 1)
        return jnp.take_along_axis(table, idx, axis=1), jnp.zeros((0,), jnp.float32)


def _table(prompts, continuations, width):
    table = np.zeros((len(prompts), width), np.int32)
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        seq = p + c
        table[b, : len(seq)] = seq
    return jnp.asarray(table)


@pytest.mark.parametrize("k", [1, 3])
def test_telemetry_perfect_and_always_wrong_proposals(k, loaded):
    m = loaded("e2b")
    prompts = _prompts(3)
    n = 25
    truth = generate(m, prompts, max_new_tokens=n + k + 1, stop_tokens=[]).tokens  # lookahead for proposals
    width = max(map(len, prompts)) + n + k + 2

    right = generate(m, prompts, drafter=Proposer(TableProposals(), _table(prompts, truth, width)),
                     max_new_tokens=n, num_draft_tokens=k, stop_tokens=[])
    assert right.tokens == [t[:n] for t in truth]
    steps = -(-(n - 1) // (k + 1))  # every step yields K+1 tokens; the last may be cut by the budget
    for row in right.stats["rows"]:
        assert row["verify_steps"] == steps
        assert row["accept_histogram"] == [0] * k + [steps]
    assert right.stats["mean_tokens_per_step"] == pytest.approx((n - 1) / steps)
    assert right.stats["acceptance_rate"] == 1.0

    # A budget that ends inside a round: the drafts it leaves no room for were never proposed.
    cut = generate(m, prompts, drafter=Proposer(TableProposals(), _table(prompts, truth, width)),
                   max_new_tokens=n - 1, num_draft_tokens=k, stop_tokens=[])
    assert cut.tokens == [t[: n - 1] for t in truth]
    assert cut.stats["acceptance_rate"] == 1.0
    assert cut.stats["proposed_drafts"] == cut.stats["accepted_drafts"] == sum(
        sum(a * h for a, h in enumerate(row["accept_histogram"])) for row in cut.stats["rows"])

    wrong_cont = [[(t + 1) % 512 for t in row] for row in truth]
    wrong = generate(m, prompts, drafter=Proposer(TableProposals(), _table(prompts, wrong_cont, width)),
                     max_new_tokens=n, num_draft_tokens=k, stop_tokens=[])
    assert wrong.tokens == [t[:n] for t in truth]  # still lossless
    assert wrong.stats["accepted_drafts"] == 0 and wrong.stats["acceptance_rate"] == 0.0
    for row in wrong.stats["rows"]:
        assert row["verify_steps"] == n - 1 and row["mean_tokens_per_step"] == 1.0
        assert row["accept_histogram"] == [n - 1] + [0] * k


def test_partially_right_proposals_are_lossless_with_mixed_acceptance(loaded):
    """Proposals right 60% of the time: rows accept different lengths each step, exercising rollback."""
    m = loaded("moe")
    prompts, k, n = _prompts(8), 4, MAX_NEW
    truth = generate(m, prompts, max_new_tokens=n + k + 1, stop_tokens=[]).tokens
    rng = np.random.default_rng(3)
    noisy = [[t if rng.random() < 0.6 else (t + 1) % 512 for t in row] for row in truth]
    width = max(map(len, prompts)) + n + k + 2
    out = generate(m, prompts, drafter=Proposer(TableProposals(), _table(prompts, noisy, width)),
                   max_new_tokens=n, num_draft_tokens=k, stop_tokens=[])
    assert out.tokens == [t[:n] for t in truth]
    hist = out.stats["accept_histogram"]
    assert sum(1 for h in hist if h > 0) >= 3  # several different acceptance lengths occurred
    assert out.stats["accepted_drafts"] == sum(a * h for a, h in enumerate(hist))


def test_stop_tokens_end_rows_and_are_kept(loaded, drafter):
    m = loaded("e2b")
    prompts = _prompts(3)
    free = _plain(m, 3, MAX_NEW).tokens
    stop = free[1][6]  # a token row 1 produces at index 6
    out = generate(m, prompts, drafter=drafter("e2b"), max_new_tokens=MAX_NEW, num_draft_tokens=3,
                   stop_tokens=[stop])
    for row, full in zip(out.tokens, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]


def test_speculative_greedy_on_a_2x4_mesh(hf_target, drafter, loaded):
    mesh = gemma4_jax.sharding.make_mesh(2, 4)
    _, path = hf_target("moe")
    target = gemma4_jax.load(path, dtype="float32", mesh=mesh)
    d = drafter("moe")
    d = gemma4_jax.load(d.path, dtype="float32", mesh=mesh)
    out = generate(target, _prompts(8), drafter=d, max_new_tokens=24, num_draft_tokens=3, stop_tokens=[])
    assert out.tokens == [t[:24] for t in _plain(loaded("moe"), 8, MAX_NEW).tokens]


# --- exact speculative sampling -------------------------------------------------------------

ROWS = 20_000
PROMPT = [7, 300, 41, 12, 99, 250]


@dataclasses.dataclass(frozen=True)
class NoisyTargetProposals:
    """K=1 proposals from a perturbed copy of the target's own next-token distribution: close enough
    to p that most drafts are accepted, different enough that a wrong rule shows."""

    def __call__(self, params, ctx, key, K, warp):
        assert K == 1
        hidden, _ = model.forward(ctx.target_params, ctx.target_cfg, ctx.last[:, None], ctx.cache)
        lg = model.logits(ctx.target_params, ctx.target_cfg, hidden)[:, 0]
        q = warp.probs(lg + 1.5 * jnp.sin(jnp.arange(lg.shape[-1]) * 1.3))
        return sampling.sample(key, q)[:, None], q[:, None]


def _exact_distributions(m, warp):
    """Target's exact distributions of the first token and (marginal) second token."""
    lg1 = m.logits(np.array([PROMPT]))[0, -1]
    p1 = np.asarray(warp.probs(jnp.asarray(lg1)), np.float64)
    seqs = np.array([PROMPT + [x] for x in range(len(p1))])
    p2_given = np.asarray(warp.probs(jnp.asarray(m.logits(seqs)[:, -1])), np.float64)
    return p1, p1 @ p2_given


def _chi2_pvalue(samples, probs):
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, "sampled a token the target gives zero probability"
    expected = probs * len(samples)
    big = expected >= 5  # merge rare categories into one bin
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    return float(jax.scipy.stats.chi2.sf(stat, keep.sum() - 1))


def _sample_two(m, proposer, k, warp, seed):
    out = generate(m, [PROMPT] * ROWS, drafter=proposer, max_new_tokens=2, num_draft_tokens=k,
                   temperature=warp.temperature, top_k=warp.top_k, top_p=warp.top_p, seed=seed, stop_tokens=[])
    toks = np.array(out.tokens)
    assert toks.shape == (ROWS, 2)
    return toks, out.stats


@pytest.mark.parametrize("warp,with_drafter", [(sampling.Warp(1.0), True),
                                               (sampling.Warp(0.8, top_k=40, top_p=0.9), False)],
                         ids=["t1", "topk_topp"])
def test_speculative_sampling_matches_target_distribution(warp, with_drafter, loaded, drafter):
    m = loaded("e2b")
    p1, p2 = _exact_distributions(m, warp)
    proposers = [(Proposer(NoisyTargetProposals(), None), 1)] + ([(drafter("e2b"), 2)] if with_drafter else [])
    proposers.append((None, None))  # plain sampling, the baseline
    for proposer, k in proposers:
        toks, stats = _sample_two(m, proposer, k, warp, seed=11)
        assert stats["accepted_drafts"] > 0 or proposer is None
        assert _chi2_pvalue(toks[:, 0], p1) > 1e-3
        assert _chi2_pvalue(toks[:, 1], p2) > 1e-3


def test_chi_square_catches_a_wrong_acceptance_rule(loaded, monkeypatch):
    """Resampling from p (instead of normalize(max(p - q, 0))) after a rejection is a classic bug;
    the same statistical test must reject it."""

    right = sampling.accept_sampled

    def wrong(key, drafts, q, p):
        a, _ = right(key, drafts, q, p)
        rows = jnp.arange(drafts.shape[0])
        return a, jnp.where(a < drafts.shape[1], sampling.sample(jax.random.fold_in(key, 1), p[rows, a]),
                            sampling.sample(key, p[rows, a]))

    m = loaded("e2b")
    warp = sampling.Warp(1.0)
    _, p2 = _exact_distributions(m, warp)
    jax.clear_caches()
    monkeypatch.setattr(sampling, "accept_sampled", wrong)
    try:
        toks, stats = _sample_two(m, Proposer(NoisyTargetProposals(), None), 1, warp, seed=11)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert stats["accepted_drafts"] > ROWS // 4
    assert _chi2_pvalue(toks[:, 1], p2) < 1e-6


def test_stream_yields_the_same_tokens_as_generate(loaded, drafter):
    from gemma4_jax.generate import Stream

    m = loaded("e2b")
    kwargs = dict(drafter=drafter("e2b"), max_new_tokens=MAX_NEW, num_draft_tokens=3, stop_tokens=[])
    whole = generate(m, _prompts(3), **kwargs)
    stream = Stream(m, _prompts(3), chunk_steps=2, **kwargs)
    got = [[] for _ in range(3)]
    chunks = 0
    for new in stream:
        chunks += 1
        for row, toks in zip(got, new):
            row.extend(toks)
    assert got == whole.tokens == stream.result.tokens
    assert chunks > 3  # it really streamed
    assert stream.result.stats["verify_steps"] == whole.stats["verify_steps"]


def test_recompiles_only_when_a_shape_bucket_changes(loaded):
    from gemma4_jax import generate as gen

    m = loaded("dense")
    generate(m, [[5, 6, 7]], max_new_tokens=20, stop_tokens=[])
    before = gen._generate._cache_size()
    # same prompt bucket (16), same output bucket (32): max_new_tokens is traced
    generate(m, [[1, 2, 3, 4, 5, 9]], max_new_tokens=30, seed=3, stop_tokens=[])
    assert gen._generate._cache_size() == before
    generate(m, [[5, 6, 7]], max_new_tokens=40, stop_tokens=[])  # output bucket 64
    assert gen._generate._cache_size() == before + 1
    # sampling: greedy vs sampled and top-k shape the program; temperature and top-p are traced
    a = generate(m, [[5, 6, 7]], max_new_tokens=20, temperature=0.7, top_p=0.9, seed=1, stop_tokens=[])
    assert gen._generate._cache_size() == before + 2
    b = generate(m, [[5, 6, 7]], max_new_tokens=20, temperature=1.3, top_p=0.5, seed=1, stop_tokens=[])
    assert gen._generate._cache_size() == before + 2
    assert a.tokens != b.tokens  # the traced values really changed the sampling


def test_batch_sizes_in_one_bucket_share_a_program_and_filler_rows_change_nothing(loaded, drafter):
    """3 prompts run in the 4-row program; the filler row is done from the start and not reported."""
    from gemma4_jax import generate as gen

    m, d = loaded("e2b"), drafter("e2b")
    prompts = _prompts(4)
    four = generate(m, prompts, drafter=d, max_new_tokens=12, stop_tokens=[])
    before = gen._generate._cache_size()
    three = generate(m, prompts[:3], drafter=d, max_new_tokens=12, stop_tokens=[])
    assert gen._generate._cache_size() == before
    assert three.tokens == four.tokens[:3] and len(three.stats["rows"]) == 3
    assert three.stats["verify_steps"] == sum(r["verify_steps"] for r in four.stats["rows"][:3])
    assert three.stats["new_tokens"] == 36
