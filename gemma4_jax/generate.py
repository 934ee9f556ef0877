"""Generation: prefill and the whole speculative decoding loop in one jit-compiled function.

  prefill the prompts -> first token
  lax.while_loop, per step:
    draft K tokens (a scan over drafter steps, or any Proposer)
    verify [last token, drafts] in one target pass (K+1 positions)
    accept per row (greedy prefix match, or exact speculative sampling), + one target token
    scatter the new tokens into the preallocated output, roll the cache back by what was rejected
The host only pads prompts into length buckets and reads the output buffer at the end.
Without a drafter the same loop runs with K = 0: plain decoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import cache as kv
from gemma4_jax import drafter as drafter_lib
from gemma4_jax import model, sampling, sharding
from gemma4_jax.config import Config
from gemma4_jax.sampling import Warp

# Draft length per target from public tuning (vLLM / HF user reports), keyed by target width.
DEFAULT_DRAFT_TOKENS = {1536: 2, 2560: 4, 2816: 4, 5376: 6}


@dataclasses.dataclass(frozen=True)
class DraftContext:
    """What a proposer may read (traced values inside the compiled loop)."""

    target_params: dict
    target_cfg: Config
    cache: kv.KVCache
    last: jax.Array  # [B] the token the target sees next, at position `pos`
    hidden: jax.Array  # [B, D] target post-norm hidden state that produced `last`
    pos: jax.Array  # [B]


@dataclasses.dataclass(frozen=True)
class Proposer:
    """Draft proposals. `fn(params, ctx, key, K, warp)` returns (tokens [B, K] int32, q [B, K, V]
    float32: the distribution each draft was drawn from; may be anything when warp is greedy).
    `fn` must be hashable by value (it is a static argument of the compiled loop)."""

    fn: Callable
    params: Any


@dataclasses.dataclass(frozen=True)
class DrafterProposals:
    dcfg: drafter_lib.DrafterConfig

    def __call__(self, dparams, ctx: DraftContext, key, K: int, warp: Warp):
        views = drafter_lib.target_kv(ctx.target_cfg, ctx.cache)
        # every step of the round sits at one position: RoPE tables and masks once per round
        round_ctx = drafter_lib.context(self.dcfg, ctx.pos[:, None], views, dparams["pre"].dtype)

        def one(carry, k):
            tok, h = carry
            x = jnp.concatenate([model.embed(ctx.target_params, ctx.target_cfg, tok[:, None]),
                                 h[:, None].astype(ctx.hidden.dtype)], axis=-1)
            logits, h = drafter_lib.step(dparams, self.dcfg, x, ctx.pos, views, round_ctx)
            q = jnp.zeros((0,), jnp.float32) if warp.greedy else warp.probs(logits[:, 0])
            d = jnp.argmax(logits[:, 0], -1).astype(jnp.int32) if warp.greedy else sampling.sample(k, q)
            return (d, h[:, 0]), (d, q)

        _, (tokens, q) = jax.lax.scan(one, (ctx.last, ctx.hidden), jax.random.split(key, K))
        return tokens.T, (q if warp.greedy else jnp.swapaxes(q, 0, 1))


@flax.struct.dataclass
class State:
    cache: kv.KVCache
    last: jax.Array  # [B]
    hidden: jax.Array  # [B, D]
    out: jax.Array  # [B, N] new tokens (-1 past out_len)
    out_len: jax.Array  # [B]
    done: jax.Array  # [B] bool
    key: jax.Array
    steps: jax.Array  # [B] verify steps while active
    accepted: jax.Array  # [B] accepted drafts
    proposed: jax.Array  # [B] drafts that could have been kept (K, or what the token budget left)
    histogram: jax.Array  # [B, K+1] accepted-draft counts per step


@dataclasses.dataclass
class Result:
    tokens: list[list[int]]
    stats: dict


def _is_stop(tokens: jax.Array, stop: tuple[int, ...]) -> jax.Array:
    if not stop:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(stop, jnp.int32), axis=-1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled generation program (a new value recompiles)."""

    cfg: Config
    propose: Callable | None
    K: int
    warp: Warp  # its static part (Warp.static); the numbers are traced arguments
    stop: tuple[int, ...]
    out_size: int  # output buffer width (a power-of-two bucket of max_new_tokens)
    max_len: int  # cache positions: prompt bucket + out_size + K + 1


def _start(params, tokens, lengths, max_new, key, warp_values, plan: Plan) -> State:
    """Prefill the right-padded prompts and pick each row's first token. Rows of length 0 fill up
    the batch bucket: they are done from the start."""
    cfg, B = plan.cfg, tokens.shape[0]
    filler = lengths == 0
    lengths = jnp.maximum(lengths, 1)
    warp = plan.warp.bind(warp_values)
    cache = kv.init(cfg, B, plan.max_len, block=plan.K + 1, dtype=params["embed"].dtype)
    hidden, cache = model.prefill(params, cfg, tokens, cache, lengths)
    h_last = hidden[jnp.arange(B), lengths - 1]
    key, k0 = jax.random.split(key)
    first = sampling.select(k0, warp, model.logits(params, cfg, h_last[:, None])[:, 0])
    out = jnp.full((B, plan.out_size), -1, jnp.int32).at[:, 0].set(first)
    zeros = jnp.zeros((B,), jnp.int32)
    return State(cache=cache, last=first, hidden=h_last, out=out, out_len=zeros + 1,
                 done=_is_stop(first, plan.stop) | (max_new <= 1) | filler, key=key, steps=zeros, accepted=zeros,
                 proposed=zeros, histogram=jnp.zeros((B, plan.K + 1), jnp.int32))


def _run(params, prop_params, state: State, max_new, max_steps, warp_values, plan: Plan) -> State:
    """The decoding loop: until every row is done, or `max_steps` verify steps have run."""
    cfg, K, warp, stop = plan.cfg, plan.K, plan.warp.bind(warp_values), plan.stop
    B = state.last.shape[0]
    rows, j, zeros = jnp.arange(B), jnp.arange(K + 1)[None, :], jnp.zeros((B,), jnp.int32)

    def body(carry):
        s, i = carry
        key, k_draft, k_accept = jax.random.split(s.key, 3)
        active = ~s.done
        if K:
            ctx = DraftContext(params, cfg, s.cache, s.last, s.hidden, s.cache.length)
            drafts, q = plan.propose(prop_params, ctx, k_draft, K, warp)
            block = jnp.concatenate([s.last[:, None], drafts], axis=1)
        else:
            drafts, q, block = jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0, cfg.vocab_size)), s.last[:, None]
        hid, cache = model.forward(params, cfg, block, s.cache, jnp.where(active, K + 1, 0))
        lg = model.logits(params, cfg, hid)
        if warp.greedy:
            a, nxt = sampling.accept_greedy(drafts, lg)
        else:
            a, nxt = sampling.accept_sampled(k_accept, drafts, q, warp.probs(lg))
        # New tokens of this step: the accepted drafts, then the target's token.
        emit = jnp.where(j < a[:, None], jnp.concatenate([drafts, zeros[:, None]], axis=1), nxt[:, None])
        n = a + 1
        stops = _is_stop(emit, stop) & (j < n[:, None])
        hit = jnp.any(stops, axis=1)
        n = jnp.where(hit, jnp.argmax(stops, axis=1) + 1, n)
        n = jnp.where(active, jnp.minimum(n, max_new - s.out_len), 0)
        slots = jnp.where(j < n[:, None], s.out_len[:, None] + j, plan.out_size)
        out = s.out.at[rows[:, None], slots].set(emit, mode="drop")
        cache = kv.rollback(cache, jnp.where(active, K - a, 0))  # keep [last, accepted drafts]
        out_len = s.out_len + n
        done = s.done | hit | (out_len >= max_new) | (cache.length + K + 1 > plan.max_len)
        kept = jnp.minimum(a, n)  # accepted drafts that were emitted (a stop or the budget may cut)
        return State(cache=cache, last=nxt, hidden=hid[rows, a], out=out, out_len=out_len, done=done, key=key,
                     steps=s.steps + active, accepted=s.accepted + jnp.where(active, kept, 0),
                     proposed=s.proposed + jnp.where(active, jnp.minimum(K, max_new - s.out_len), 0),
                     histogram=s.histogram.at[rows, kept].add(active.astype(jnp.int32))), i + 1

    return jax.lax.while_loop(lambda c: jnp.any(~c[0].done) & (c[1] < max_steps), body, (state, 0))[0]


@functools.partial(jax.jit, static_argnames="plan")
def _generate(params, prop_params, tokens, lengths, max_new, key, warp_values, plan: Plan) -> State:
    """Prefill and the whole loop, one program."""
    state = _start(params, tokens, lengths, max_new, key, warp_values, plan)
    return _run(params, prop_params, state, max_new, jnp.iinfo(jnp.int32).max, warp_values, plan)


_start_jit = jax.jit(_start, static_argnames="plan")
_run_jit = jax.jit(_run, static_argnames="plan", donate_argnames="state")

MAX_DRAFT_TOKENS = 64

# Tracing, lowering and compiling (or fetching from the compilation cache) happen inside the first
# call of each shape. JAX reports their time spans; `_Clock` subtracts them so that `seconds` and
# tokens/s measure generation, and `compile_seconds` the rest.
_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})
_spans = threading.local()


def _on_span(event: str, start: float, end: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS and getattr(_spans, "active", None) is not None:
        _spans.active.append((start, end))


jax.monitoring.register_event_time_span_listener(_on_span)


class _Clock:
    """Wall time of a block, split into compilation (the union of JAX's compile spans: nested
    spans count once) and the rest."""

    def __enter__(self):
        self._outer, _spans.active = getattr(_spans, "active", None), []
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        self.total = time.time() - self.start
        spans, _spans.active = sorted(_spans.active), self._outer
        if self._outer is not None:
            self._outer.extend(spans)
        self.compile_seconds, end = 0.0, -math.inf
        for s, e in spans:
            if e > end:
                self.compile_seconds += e - max(s, end)
                end = e
        self.seconds = max(self.total - self.compile_seconds, 0.0)


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


def _batch_bucket(n: int, mesh) -> int:
    """Rows the compiled program has for n prompts: 1, 2, 4, 8, then multiples of 8, and a multiple
    of the mesh's data axis, so that a last, smaller batch of a job reuses the program (and its
    rows still shard)."""
    b = 1 << math.ceil(math.log2(n)) if n <= 8 else -(-n // 8) * 8
    d = mesh.shape.get(sharding.DATA, 1) if mesh is not None else 1
    return -(-b // d) * d


def _check_draft_tokens(k, what: str) -> None:
    if k is not None and (not sampling.is_int(k) or not 1 <= k <= MAX_DRAFT_TOKENS):
        raise ValueError(f"{what} must be an integer in [1, {MAX_DRAFT_TOKENS}], got {k!r}")


def _stop_tokens(model_obj, stop_tokens) -> tuple[int, ...]:
    if stop_tokens is None:
        eos = model_obj.generation_config.get("eos_token_id", [])
        stop_tokens = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(sorted({int(t) for t in stop_tokens}))


@dataclasses.dataclass
class _Job:
    plan: Plan
    params: Any
    prop_params: Any
    tokens: jax.Array
    lengths: jax.Array
    max_new: jax.Array
    key: jax.Array
    warp_values: jax.Array
    mesh: Any
    rows: int  # the caller's rows; the batch bucket may add filler rows after them

    def context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


def _prepare(model_obj, prompts, drafter, max_new_tokens, num_draft_tokens, temperature, top_k, top_p, seed,
             stop_tokens) -> _Job:
    """Checks the inputs and pads the prompts into a length bucket (the host's only work)."""
    from gemma4_jax.api import Drafter, Model

    if isinstance(model_obj, Drafter) or not isinstance(getattr(model_obj, "config", None), Config):
        raise ValueError(f"{getattr(model_obj, 'path', None) or 'model'}: is not a target model "
                         "(a drafter checkpoint goes in `drafter=`)")
    if drafter is not None and not isinstance(drafter, (Drafter, Proposer)):
        where = getattr(drafter, "path", None) or "drafter"
        raise ValueError(f"{where}: is not a drafter (an assistant checkpoint or a Proposer)"
                         + (": it is a target model" if isinstance(drafter, Model) else ""))
    cfg: Config = model_obj.config
    warp = Warp(float(temperature), top_k, top_p)
    if not sampling.is_int(seed) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    if not sampling.is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    _check_draft_tokens(num_draft_tokens, "num_draft_tokens")
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (e.g. <bos>)")
        not_int = [t for t in p if not sampling.is_int(t)]
        if not_int:
            raise ValueError(f"prompt {i}: token ids must be integers, got {not_int[0]!r}")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(map(len, prompts))
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")

    propose, prop_params, K = None, None, 0
    if drafter is not None:
        if isinstance(drafter, Proposer):
            propose, prop_params = drafter.fn, drafter.params
            default_k = 4
        else:
            drafter_lib.check_compatible(drafter.config, cfg, where=drafter.path or "drafter")
            propose, prop_params = DrafterProposals(drafter.config), drafter.params
            default_k = drafter.generation_config.get("num_assistant_tokens")
            _check_draft_tokens(default_k, f"{drafter.path or 'drafter'}: generation_config.json num_assistant_tokens")
            default_k = default_k or DEFAULT_DRAFT_TOKENS.get(cfg.hidden_size, 4)
        K = int(num_draft_tokens if num_draft_tokens is not None else default_k)

    # A Proposer's params may hold per-row data, so it sees exactly the caller's rows.
    B = len(prompts) if isinstance(drafter, Proposer) else _batch_bucket(len(prompts), model_obj.mesh)
    T = _bucket(longest)
    tokens = np.zeros((B, T), np.int32)
    lengths = np.zeros((B,), np.int32)  # 0: a filler row of the batch bucket, done from the start
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    out_size = _bucket(max_new_tokens)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    if model_obj.mesh is not None:
        tokens = jax.device_put(tokens, sharding.batch_sharding(model_obj.mesh, tokens.shape))
        lengths = jax.device_put(lengths, sharding.batch_sharding(model_obj.mesh, lengths.shape))
    plan = Plan(cfg=cfg, propose=propose, K=K, warp=warp.static(), stop=_stop_tokens(model_obj, stop_tokens),
                out_size=out_size, max_len=T + out_size + K + 1)
    return _Job(plan, model_obj.params, prop_params, tokens, lengths, jnp.int32(max_new_tokens),
                jax.random.key(seed), warp.values(), model_obj.mesh, len(prompts))


def _result(state: State, n_rows: int, seconds: float, compile_seconds: float) -> Result:
    out, out_len, steps, accepted, proposed, hist = (x[:n_rows] for x in jax.device_get(
        (state.out, state.out_len, state.steps, state.accepted, state.proposed, state.histogram)))
    stats = _stats(out_len, steps, accepted, proposed, hist, seconds)
    stats["compile_seconds"] = compile_seconds
    return Result(tokens=[out[i, : out_len[i]].tolist() for i in range(n_rows)], stats=stats)


def generate(model_obj, prompts: Sequence[Sequence[int]], *, drafter=None, max_new_tokens: int,
             num_draft_tokens: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] | None = None) -> Result:
    """Generates up to `max_new_tokens` tokens for each prompt (a list of token-id lists).

    With a `drafter` (a loaded assistant checkpoint, or a `Proposer`), decoding is speculative and
    lossless: greedy output equals plain greedy output, and sampling is exact speculative sampling
    (the output distribution equals sampling from the target). Without one, plain decoding.
    Returns `Result(tokens, stats)`: per row the new tokens (ending with the stop token when one
    was produced) and telemetry (`new_tokens`, `verify_steps`, `accepted_drafts`, `proposed_drafts`,
    `acceptance_rate`, `mean_tokens_per_step`, `accept_histogram`, `seconds` and `tokens_per_second`
    of the generation itself, `compile_seconds` (0 when this shape was compiled before), `rows`).
    Rows draw independent randomness from `seed`.
    """
    job = _prepare(model_obj, prompts, drafter, max_new_tokens, num_draft_tokens, temperature, top_k, top_p,
                   seed, stop_tokens)
    with job.context(), _Clock() as clock:
        state = _generate(job.params, job.prop_params, job.tokens, job.lengths, job.max_new, job.key,
                          job.warp_values, job.plan)
        state.out.block_until_ready()
    return _result(state, job.rows, clock.seconds, clock.compile_seconds)


class Stream:
    """Iterates over the new tokens of each row, chunk by chunk, while generating; `result` holds
    the final `Result` once iteration ends. Same arguments and outputs as `generate`; the loop runs
    `chunk_steps` verify steps per compiled call, so the host prints while nothing waits on it
    longer than one chunk."""

    def __init__(self, model_obj, prompts, *, chunk_steps: int = 8, **kwargs):
        self._job = _prepare(model_obj, prompts, kwargs.pop("drafter", None), kwargs.pop("max_new_tokens"),
                             kwargs.pop("num_draft_tokens", None), kwargs.pop("temperature", 0.0),
                             kwargs.pop("top_k", None), kwargs.pop("top_p", None), kwargs.pop("seed", 0),
                             kwargs.pop("stop_tokens", None))
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if not sampling.is_int(chunk_steps) or chunk_steps < 1:
            raise ValueError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
        self._chunk = int(chunk_steps)
        self.result: Result | None = None

    def __iter__(self):
        job = self._job
        seconds = compile_seconds = 0.0
        with job.context():
            seen = np.zeros(job.rows, np.int64)
            with _Clock() as clock:
                state = _start_jit(job.params, job.tokens, job.lengths, job.max_new, job.key, job.warp_values,
                                   job.plan)
                out, out_len, done = jax.device_get((state.out, state.out_len, state.done))
            while True:
                seconds, compile_seconds = seconds + clock.seconds, compile_seconds + clock.compile_seconds
                yield [out[i, seen[i]: out_len[i]].tolist() for i in range(len(seen))]  # untimed: the caller's
                seen = out_len.astype(np.int64)
                if done.all():
                    break
                with _Clock() as clock:
                    state = _run_jit(job.params, job.prop_params, state, job.max_new, self._chunk, job.warp_values,
                                     job.plan)
                    out, out_len, done = jax.device_get((state.out, state.out_len, state.done))
        self.result = _result(state, job.rows, seconds, compile_seconds)


def _summary(new, steps, accepted, proposed, hist, seconds):
    return {
        "new_tokens": int(new),
        "verify_steps": int(steps),
        "accepted_drafts": int(accepted),
        # drafts that could have been kept: K per step, fewer where the token budget ran out
        "proposed_drafts": int(proposed),
        "acceptance_rate": float(accepted / proposed) if proposed else 0.0,
        # the first token comes from the prefill; each verify step yields the rest
        "mean_tokens_per_step": float((new - 1) / steps) if steps else 0.0,
        "accept_histogram": [int(h) for h in hist],
        "seconds": seconds,
        "tokens_per_second": float(new / seconds) if seconds > 0 else 0.0,
    }


def _stats(out_len, steps, accepted, proposed, hist, seconds) -> dict:
    total = _summary(out_len.sum(), steps.sum(), accepted.sum(), proposed.sum(), hist.sum(0), seconds)
    total["mean_tokens_per_step"] = float((out_len.sum() - len(out_len)) / steps.sum()) if steps.sum() else 0.0
    total["rows"] = [_summary(out_len[i], steps[i], accepted[i], proposed[i], hist[i], seconds)
                     for i in range(len(out_len))]
    return total
