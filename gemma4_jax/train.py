"""Training with optax: pretraining a target from scratch, and distilling an MTP drafter against a
frozen target (`gemma4-jax train-drafter`).

Distillation shows the drafter exactly what it sees at inference (generate.DrafterProposals). A
round at position p, where the target has just produced token t_p from its post-norm hidden state
at p-1, runs K draft steps at the constant position p over the target's K/V of positions < p:

  step 1:   x = [target_embed(t_p), hidden[p-1]]          -> d1, meant to be the target's token at p+1
  step j>1: x = [target_embed(token at p+j-1), carry]     -> dj, meant to be the target's token at p+j

One target forward over a training sequence gives every round's inputs at once: its hidden states,
its distributions at every position, and its K/V (through a cache as long as the sequence, so
every key keeps its slot position). The drafter then runs each step j for all rounds p of the
sequence in one pass (drafter.forward with query positions [B, T]); the K steps are unrolled with
the drafter's own carry, and gradients flow through it.

The token fed at step j>1 is the target's greedy token at the previous position: the draft the
target would accept. Labels are the target's distributions at p+j, which are conditioned on the
sequence's own tokens; where the sequence differs from the greedy chain the label would not be the
distribution after the accepted drafts, so those (round, step) pairs are masked out (`chain_mask`).
Sequences sampled from the target itself agree with its greedy chain most often.

Losses: "kl" = KL(target || drafter) of the distributions at temperature 1, "ce" = cross-entropy on
the target's argmax (what greedy acceptance rewards). Measured on a tiny trained target (K=3, 400
steps, four drafter/data settings): "ce" gives the higher greedy acceptance in all four (e.g. 0.91
vs 0.81), "kl" the higher acceptance when sampling at temperature 1 (e.g. 0.36 vs 0.30).

With ordered embeddings the drafter's head is trained dense, and its centroid scores learn the
target's distribution over token clusters (the cluster of its argmax for "ce"), which are derived
once by balanced k-means over the target's embeddings (`cluster_embeddings`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma4_jax import cache as kv
from gemma4_jax import drafter as drafter_lib
from gemma4_jax import model, params as params_lib, sharding
from gemma4_jax.config import FULL, SLIDING, Config
from gemma4_jax.drafter import DrafterConfig

f32 = jnp.float32
LOSSES = ("kl", "ce")


# --- shared machinery -----------------------------------------------------------------------------

def optimizer(lr: float, steps: int, *, warmup: int | None = None, weight_decay: float = 0.01,
              clip: float = 1.0, end_fraction: float = 0.1) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to `end_fraction * lr`, after global-norm clipping.
    Weight decay applies to matrices only (not norms, scalars or index tables)."""
    warmup = max(1, steps // 20) if warmup is None else warmup
    warmup = min(warmup, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * end_fraction)
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))


def _iterate(batches, steps: int):
    """A sequence (or stacked array) of batches is cycled; an iterator must last `steps` batches."""
    if isinstance(batches, (Sequence, np.ndarray, jax.Array)):
        if len(batches) == 0:
            raise ValueError("batches is empty")
        for i in range(steps):
            yield batches[i % len(batches)]
        return
    it = iter(batches)
    for i in range(steps):
        try:
            yield next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {i} of {steps} steps") from None


def _placer(mesh, vocab_size: int):
    """(place parameters, place a batch): into their shardings when there is a mesh. Batches are
    checked on the host: an out-of-vocabulary id would silently read a clamped embedding row."""

    def place(tree, decl):
        return jax.device_put(tree) if mesh is None else jax.device_put(tree, sharding.param_shardings(decl, mesh))

    def batch(x):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] < 2 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"a batch must be integer token ids [batch, length >= 2], got {x.dtype} {x.shape}")
        if x.min() < 0 or x.max() >= vocab_size:
            bad = x[(x < 0) | (x >= vocab_size)][0]
            raise ValueError(f"batch has token id {int(bad)} outside the vocabulary [0, {vocab_size})")
        x = x.astype(np.int32)
        return jnp.asarray(x) if mesh is None else jax.device_put(x, sharding.batch_sharding(mesh, x.shape))

    return place, batch


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _cast(tree, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_params(decl, seed: int = 0) -> dict:
    """Random float32 parameters for a declaration tree (params.declare / drafter.declare), drawn on
    the host: the same initialisers as params.init (normal std 0.02, ones, arange) without
    compiling a random-number kernel per parameter shape."""
    rng = np.random.default_rng(seed)

    def one(p: params_lib.Param):
        if p.init == "ones":
            return np.ones(p.shape, np.dtype(p.dtype or np.float32))
        if p.init == "arange":
            return np.arange(p.shape[0], dtype=np.dtype(p.dtype or np.float32))
        return (0.02 * rng.standard_normal(p.shape, np.float32)).astype(np.dtype(p.dtype or np.float32))

    return jax.tree.map(one, decl, is_leaf=params_lib.is_param)


def _training_copy(tree):
    """float32 copies of given parameters: the compiled steps donate their buffers, and the
    caller's arrays must survive."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=f32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                            copy=True), tree)


def _stream(batches, steps: int, place_batch, skip: int = 0):
    """Placed batches after the first `skip` (already trained on: a resumed run replays the data
    order without them); the first placed batch is checked now, before anything compiles."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if skip >= steps:
        return iter(())
    raw = _iterate(batches, steps)
    for _ in range(skip):
        next(raw)
    it = (place_batch(b) for b in raw)
    return itertools.chain([next(it)], it)


class Checkpoints:
    """Progress of one training run in `directory` (orbax): the training state every `every` steps,
    so that the same run, started again, resumes from the last one instead of step 0. `options`
    (a JSON-able dict) identifies the run: a directory left by a run with other options is refused."""

    def __init__(self, directory: str, every: int, options: dict):
        import orbax.checkpoint as ocp

        if not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint every must be an integer >= 1, got {every!r}")
        self.directory, self.every, self._ocp = os.path.abspath(directory), every, ocp
        self._manager = ocp.CheckpointManager(os.path.join(self.directory, "state"),
                                              options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        meta = os.path.join(self.directory, "run.json")
        if os.path.exists(meta) and self.latest_step():  # progress to resume: it must be this run's
            with open(meta, encoding="utf-8") as f:
                saved = json.load(f)
            differ = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
            if differ:
                k = differ[0]
                raise TrainError(f"{self.directory} holds an unfinished run with other options ({k}: "
                                 f"{saved.get(k)!r} there, {options.get(k)!r} now); delete it to start over")
        else:  # a new run, or one that stopped before its first save
            with open(meta + ".tmp", "w", encoding="utf-8") as f:
                json.dump(options, f, indent=1, sort_keys=True)
            os.replace(meta + ".tmp", meta)

    def latest_step(self) -> int:
        """The step of the last saved state (0: none yet)."""
        return int(self._manager.latest_step() or 0)

    def restore(self, state):
        """(the last saved state, its step), or (state, 0) when there is none yet."""
        step = self.latest_step()
        if not step:
            return state, 0
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, state)
        return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract)), int(step)

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=self._ocp.args.StandardSave(state))
        self._manager.wait_until_finished()  # the next step donates these buffers

    def remove(self) -> None:
        """The run is done (its result written): its progress goes."""
        self._manager.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _run(step_fn, state, stream, steps, on_step, log_every, mesh, checkpoints=None, first: int = 0):
    start = time.perf_counter()
    with _mesh_context(mesh):
        for i, batch in enumerate(stream, start=first):
            state, loss, metrics = step_fn(state, batch)
            if on_step is not None and (i % log_every == 0 or i == steps - 1):
                on_step(i, float(loss), jax.device_get(metrics), time.perf_counter() - start)
            if checkpoints is not None and (i + 1) % checkpoints.every == 0 and i + 1 < steps:
                checkpoints.save(i + 1, state)
    return state


# --- pretraining --------------------------------------------------------------------------------

def lm_loss(params: dict, cfg: Config, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of the target over tokens [B, T] (full forward, no cache)."""
    hidden, _ = model.forward(params, cfg, tokens[:, :-1])
    logits = model.logits(params, cfg, hidden)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def pretrain(cfg: Config, batches, *, steps: int, lr: float = 1e-3, seed: int = 0, dtype="float32",
             params: dict | None = None, mesh=None, on_step: Callable | None = None, log_every: int = 50) -> dict:
    """Trains a target with config `cfg` on `batches` (token arrays [B, T]; a sequence is cycled)
    for `steps` AdamW steps; parameters are float32 while training and returned in `dtype`.
    `params` continues from given weights (default: random init from `seed`). With `mesh`,
    parameters and batches are sharded by sharding.RULES. `on_step(step, loss, metrics, seconds)` is
    called every `log_every` steps (each call waits for the device)."""
    decl = params_lib.declare(cfg)
    place, place_batch = _placer(mesh, cfg.vocab_size)
    stream = _stream(batches, steps, place_batch)
    p = init_params(decl, seed) if params is None else _training_copy(params)
    p = place(p, decl)
    opt = optimizer(lr, steps)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, tokens):
        p, opt_state = state
        loss, grads = jax.value_and_grad(lm_loss)(p, cfg, tokens)
        updates, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss, {}

    with _mesh_context(mesh):
        state = (p, jax.jit(opt.init)(p))
    p, _ = _run(step, state, stream, steps, on_step, log_every, mesh)
    return _cast(p, dtype)


# --- drafter construction -----------------------------------------------------------------------

def drafter_config_for(target: Config, *, hidden_size: int, num_layers: int = 4, intermediate_size: int | None = None,
                       num_centroids: int = 0, centroid_top_k: int | None = None) -> DrafterConfig:
    """A drafter config that fits `target`: its head dims, the KV-head counts of the target's
    K/V-producing layers, RoPE, window and vocabulary; backbone = the target's width. Layers are
    sliding except the last (full), as the released drafters; a target without sliding layers gets
    full layers only. `num_centroids` > 0 turns on ordered embeddings."""
    if hidden_size < 1 or num_layers < 1:
        raise ValueError(f"hidden_size and num_layers must be >= 1, got {hidden_size}, {num_layers}")
    kinds = set(target.kv_layers)
    if FULL not in kinds:
        raise ValueError("the target has no full-attention layer whose K/V a drafter could read")
    types = tuple(SLIDING if (i < num_layers - 1 and SLIDING in kinds) else FULL for i in range(num_layers))
    heads = {kind: target.layers[i].num_kv_heads for kind, i in target.kv_layers.items()}
    text = Config(
        vocab_size=target.vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size, num_heads=target.num_heads,
        num_kv_heads=heads.get(SLIDING, target.num_kv_heads), head_dim=target.head_dim,
        global_head_dim=target.global_head_dim, num_global_kv_heads=heads[FULL], layer_types=types,
        sliding_window=target.sliding_window, rope_sliding=target.rope_sliding, rope_full=target.rope_full,
        rms_norm_eps=target.rms_norm_eps, max_position_embeddings=target.max_position_embeddings,
    ).validate("drafter config")
    text = dataclasses.replace(text, num_kv_shared_layers=num_layers)  # every layer reads the target's K/V
    C = int(num_centroids or 0)
    if C:
        if C < 0 or target.vocab_size % C:
            raise ValueError(f"num_centroids={C} must divide the vocabulary size {target.vocab_size}")
        top = centroid_top_k or min(C, max(4, C // 64))
        if not 0 < top <= C:
            raise ValueError(f"centroid_top_k={top} must be in [1, num_centroids={C}]")
    dcfg = DrafterConfig(text=text, backbone_hidden_size=target.hidden_size, ordered_embeddings=bool(C),
                         num_centroids=C, centroid_top_k=(top if C else 0))
    drafter_lib.check_compatible(dcfg, target)
    return dcfg


def cluster_embeddings(embed: np.ndarray, num_clusters: int, *, iters: int = 8, seed: int = 0) -> np.ndarray:
    """Balanced spherical k-means over the rows of `embed` [V, D]: a token ordering [V] (int32) whose
    consecutive blocks of V / num_clusters tokens are the clusters (drafter `token_ordering`)."""
    x = np.asarray(embed, np.float32)
    V = x.shape[0]
    if V % num_clusters:
        raise ValueError(f"{num_clusters} clusters do not divide {V} tokens")
    per = V // num_clusters
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(V, num_clusters, replace=False)]
    for _ in range(iters):
        assign = _balanced_assign(x, centers, per)
        sums = np.zeros_like(centers)
        np.add.at(sums, assign, x)
        centers = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return np.argsort(_balanced_assign(x, centers, per), kind="stable").astype(np.int32)


def _balanced_assign(x: np.ndarray, centers: np.ndarray, per: int, chunk: int = 8192) -> np.ndarray:
    """Each token to its most similar cluster that still has room; the most confident tokens choose
    first. Tokens whose best few clusters are full take the best cluster with room."""
    V, C = x.shape[0], centers.shape[0]
    m = min(C, 8)
    cand = np.empty((V, m), np.int64)
    score = np.empty((V, m), np.float32)
    for s in range(0, V, chunk):
        sim = x[s:s + chunk] @ centers.T
        top = np.argpartition(-sim, m - 1, axis=1)[:, :m] if m < C else np.tile(np.arange(C), (len(sim), 1))
        val = np.take_along_axis(sim, top, axis=1)
        order = np.argsort(-val, axis=1)
        cand[s:s + chunk], score[s:s + chunk] = np.take_along_axis(top, order, 1), np.take_along_axis(val, order, 1)
    room = np.full(C, per)
    assign = np.full(V, -1)
    for t in np.argsort(-score[:, 0], kind="stable"):
        for c in cand[t]:
            if room[c]:
                assign[t], room[c] = c, room[c] - 1
                break
    for t in np.flatnonzero(assign < 0):
        sims = centers @ x[t]
        c = max(np.flatnonzero(room), key=lambda c: sims[c])
        assign[t], room[c] = c, room[c] - 1
    return assign


def init_drafter(dcfg: DrafterConfig, seed: int = 0, *, target_params: dict | None = None) -> dict:
    """Random float32 drafter parameters. With ordered embeddings, `target_params` gives the token
    clusters (k-means over the target's embedding) and the centroids start as the mean of each
    cluster's drafter embeddings."""
    p = init_params(drafter_lib.declare(dcfg), seed)
    if dcfg.ordered_embeddings:
        if target_params is None:
            raise ValueError("ordered embeddings need target_params to cluster the target's embeddings")
        C = dcfg.num_centroids
        ordering = cluster_embeddings(np.asarray(jax.device_get(target_params["embed"]), np.float32), C)
        p["ordering"] = ordering
        p["centroids"] = np.ascontiguousarray(p["embed"][ordering].reshape(C, -1, dcfg.text.hidden_size).mean(1).T)
    return jax.device_put(p)


# --- distillation -------------------------------------------------------------------------------

def target_signals(tparams: dict, tcfg: Config, tokens: jax.Array):
    """The frozen target over sequences [B, T]: post-norm hidden [B, T, Dt] (its logits at row i
    give the distribution of the token at i+1) and the drafter's views of its K/V at all T
    positions (a cache of T slots per layer, so every key keeps its position)."""
    B, T = tokens.shape
    cache = kv.init(tcfg, B, T, block=T, dtype=tparams["embed"].dtype)
    hidden, cache = model.forward(tparams, tcfg, tokens, cache)
    return hidden, drafter_lib.target_kv(tcfg, cache)


def _shift(x: jax.Array, n: int) -> jax.Array:
    """x[:, n:] padded at the end (with zeros / False) back to length T: row p holds x[p + n]."""
    if n == 0:
        return x
    pad = jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)
    return jnp.concatenate([x[:, n:], pad], axis=1)


LOGITS_BUDGET = 1 << 24  # elements of one [B, positions, V] logits block (64 MiB in float32)


def _over_chunks(fn, chunk: int, *xs, join: bool = False):
    """fn over chunks of positions: each x [B, T, ...] is cut into [B, chunk, ...] pieces (T padded
    with zeros) and fn's outputs are summed over chunks, or with `join` put back together as
    [B, T, ...]. Summed chunks are rematerialised: the vocabulary-sized logits of a chunk exist only
    while that chunk is computed, forward and backward."""
    T = xs[0].shape[1]
    n = -(-T // chunk)
    if n == 1:
        return fn(*xs)
    pad = [(0, 0), (0, n * chunk - T)]
    pieces = tuple(jnp.moveaxis(jnp.pad(x, pad + [(0, 0)] * (x.ndim - 2)).reshape(x.shape[0], n, chunk, *x.shape[2:]),
                                1, 0) for x in xs)
    if join:
        out = jax.lax.map(lambda c: fn(*c), pieces)
        return jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1).reshape(v.shape[1], n * chunk, *v.shape[3:])[:, :T], out)
    out = jax.lax.map(lambda c: jax.checkpoint(fn)(*c), pieces)
    return jax.tree.map(lambda v: v.sum(0), out)


def distill_loss(dparams: dict, dcfg: DrafterConfig, tparams: dict, tcfg: Config, tokens: jax.Array, *,
                 draft_len: int, loss: str = "ce", chain_mask: bool = True, centroid_weight: float = 1.0,
                 chunk: int | None = None):
    """Mean distillation loss over every (round p, step j) of sequences tokens [B, T] (see the module
    docstring), and metrics: `agree` [K], the share of step-j drafts (with the inference head)
    equal to the target's argmax over the (round, step) pairs that count (with `chain_mask`: rounds
    whose sequence follows the target's greedy choices for the j-1 tokens before, whatever the
    drafter drafted there), and `weight` [K], how many pairs counted.

    Vocabulary-sized logits (the target's and the drafter's) are computed `chunk` positions at a
    time (default: what keeps one [B, chunk, V] block within LOGITS_BUDGET elements) and
    recomputed in the backward pass, so memory does not grow with T x V (V = 262144 for Gemma 4)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    hidden, views = jax.lax.stop_gradient(target_signals(tparams, tcfg, tokens))
    B, T = tokens.shape
    V = tcfg.vocab_size
    chunk = int(chunk or max(1, LOGITS_BUDGET // (B * V)))
    greedy_of = lambda th: jnp.argmax(model.logits(tparams, tcfg, th), axis=-1).astype(jnp.int32)  # noqa: E731
    greedy = jax.lax.stop_gradient(_over_chunks(greedy_of, chunk, hidden, join=True))  # greedy[i]: token at i+1
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # agree[i]: the sequence's token at i+1 is the target's greedy token
    agree = jnp.concatenate([tokens[:, 1:] == greedy[:, :-1], jnp.zeros((B, 1), bool)], axis=1)
    ok = pos >= 1  # a round needs the hidden state that produced its token
    tok, carry = tokens, jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)

    def position_losses(h, th, w):
        """Sums over one chunk of positions: drafter hidden h, the target's hidden for the label th
        (row p: the state whose logits give the token at p+j+1), weights w."""
        label = jax.lax.stop_gradient(model.logits(tparams, tcfg, th))
        best = jnp.argmax(label, axis=-1)
        logq = jax.nn.log_softmax(jnp.einsum("BTD,VD->BTV", h, dparams["embed"], preferred_element_type=f32))
        logp = jax.nn.log_softmax(label)
        if loss == "kl":
            per = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
        else:
            per = -jnp.take_along_axis(logq, best[..., None], axis=-1)[..., 0]
        if dcfg.ordered_embeddings:
            per = per + centroid_weight * _centroid_loss(dparams, dcfg, h, logp, best, loss)
        draft = jnp.argmax(drafter_lib.head(dparams, dcfg, jax.lax.stop_gradient(h)), axis=-1)  # as at inference
        return {"loss": jnp.sum(per * w), "hits": jnp.sum((draft == best) * w)}

    total, count, hits, weights = 0.0, 0.0, [], []
    for j in range(draft_len):
        if j:
            tok = _shift(greedy, j - 1)  # the accepted previous draft: the target's token at p+j
            if chain_mask:
                ok = ok & _shift(agree, j - 1)
        valid = ok & (pos + j <= T - 1)
        x = jnp.concatenate([model.embed(tparams, tcfg, tok), carry.astype(hidden.dtype)], axis=-1)
        h, carry = drafter_lib.hidden(dparams, dcfg, x, pos, views)
        w = valid.astype(f32)
        sums, n = _over_chunks(position_losses, chunk, h, _shift(hidden, j), w), jnp.sum(w)
        total, count = total + sums["loss"], count + n
        hits.append(sums["hits"] / jnp.maximum(n, 1.0))
        weights.append(n)
    return total / jnp.maximum(count, 1.0), {"agree": jnp.stack(hits), "weight": jnp.stack(weights)}


def _centroid_loss(dparams, dcfg, h, logp, best, loss):
    """The centroid scores against the target's mass per token cluster (the cluster of its argmax
    for "ce"): what makes the centroid-masked head select the target's likely tokens."""
    C, V = dcfg.num_centroids, dcfg.text.vocab_size
    ordering = dparams["ordering"]
    logc = jax.nn.log_softmax(jnp.einsum("BTD,DC->BTC", h, dparams["centroids"]).astype(f32))
    if loss == "kl":
        mass = jnp.exp(logp)[..., ordering].reshape(*logp.shape[:-1], C, V // C).sum(-1)
        return -jnp.sum(mass * logc, axis=-1)
    cluster = jnp.zeros((V,), jnp.int32).at[ordering].set(jnp.arange(V, dtype=jnp.int32) // (V // C))
    return -jnp.take_along_axis(logc, cluster[best][..., None], axis=-1)[..., 0]


def distill(tparams: dict, tcfg: Config, dcfg: DrafterConfig, batches, *, steps: int, lr: float = 1e-3,
            seed: int = 0, draft_len: int = 4, loss: str = "ce", chain_mask: bool = True,
            dparams: dict | None = None, mesh=None, dtype="float32", on_step: Callable | None = None,
            log_every: int = 50, checkpoints: Checkpoints | None = None) -> dict:
    """Distils a drafter with config `dcfg` against the frozen target (`tparams`, `tcfg`) on
    `batches` of token sequences [B, T] for `steps` AdamW steps, unrolling `draft_len` draft steps.
    `dparams` continues from given weights (default: `init_drafter` from `seed`). Returns the
    drafter's parameters in `dtype`. With `mesh`, drafter parameters and batches are sharded by
    sharding.RULES (pass target parameters loaded onto the same mesh). `on_step(step, loss,
    metrics, seconds)` is called every `log_every` steps; metrics as in `distill_loss`. With
    `checkpoints`, the state is saved every `checkpoints.every` steps, and a run that finds one
    there resumes from it (the batches it already trained on are skipped)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    drafter_lib.check_compatible(dcfg, tcfg)
    decl = drafter_lib.declare(dcfg)
    place, place_batch = _placer(mesh, tcfg.vocab_size)
    p = init_drafter(dcfg, seed, target_params=tparams) if dparams is None else _training_copy(dparams)
    p = place(p, decl)
    frozen = p["ordering"]  # an index table: not trained
    train = {**p, "ordering": None}
    opt = optimizer(lr, steps)

    def objective(train, frozen, tparams, tokens):
        return distill_loss({**train, "ordering": frozen}, dcfg, tparams, tcfg, tokens, draft_len=draft_len,
                            loss=loss, chain_mask=chain_mask)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, frozen, tparams, tokens):
        train, opt_state = state
        (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(train, frozen, tparams, tokens)
        updates, opt_state = opt.update(grads, opt_state, train)
        return (optax.apply_updates(train, updates), opt_state), value, metrics

    with _mesh_context(mesh):
        state = (train, jax.jit(opt.init)(train))
    done = 0
    if checkpoints is not None:
        state, done = checkpoints.restore(state)
    stream = _stream(batches, steps, place_batch, skip=done)
    run_step = lambda state, tokens: step(state, frozen, tparams, tokens)  # noqa: E731
    train, _ = _run(run_step, state, stream, steps, on_step, log_every, mesh, checkpoints, first=done)
    return _cast({**train, "ordering": frozen}, dtype)


def sample_sequences(target, prompts: Sequence[Sequence[int]], length: int, *, temperature: float = 0.0,
                     seed: int = 0) -> np.ndarray:
    """Training sequences from the target itself: each prompt continued to `length` tokens (greedy,
    or sampled at `temperature`), as an int32 array [len(prompts), length]."""
    from gemma4_jax.generate import generate

    longest = max(map(len, prompts))
    if longest >= length:
        raise ValueError(f"prompts of {longest} tokens leave nothing to generate in sequences of {length}")
    out = generate(target, prompts, max_new_tokens=length - min(map(len, prompts)), temperature=temperature,
                   seed=seed, stop_tokens=[])
    return np.array([(list(p) + t)[:length] for p, t in zip(prompts, out.tokens)], np.int32)


# --- the command line ---------------------------------------------------------------------------

class TrainError(ValueError):
    """A bad argument or unreadable input of `train-drafter`: one line, exit code 2."""


def _int_at_least(lo: int):
    from gemma4_jax.cli import number_arg

    return lambda text: number_arg(text, low=lo, integer=True)


def _positive_float(text):
    from gemma4_jax.cli import number_arg

    return number_arg(text, low=0, low_open=True)


def _loss_name(text):
    if text not in LOSSES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOSSES)}, got {text!r}")
    return text


def add_train_drafter_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train-drafter` flags, added to `parser` (a subcommand's parser)."""
    parser.description = ("Distil a Gemma 4 MTP drafter for a target checkpoint on text files and write it as a "
                          "Hugging Face checkpoint directory (Gemma4AssistantForCausalLM).")
    a = parser.add_argument
    a("--target", required=True, metavar="DIR",
      help="target checkpoint directory (config.json, safetensors, tokenizer)")
    a("--data", required=True, nargs="+", metavar="FILE", help="UTF-8 text files to train on")
    a("--out", required=True, metavar="DIR", help="where to write the drafter checkpoint")
    a("--steps", type=_int_at_least(1), default=2000, help="optimizer steps (default 2000)")
    a("--draft-len", type=_int_at_least(1), default=4, help="draft steps unrolled per round, K (default 4)")
    a("--batch-size", type=_int_at_least(1), default=16, help="sequences per step (default 16)")
    a("--seq-len", type=_int_at_least(2), default=256, help="tokens per sequence (default 256)")
    a("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    a("--hidden-size", type=_int_at_least(1), default=None, help="drafter width (default: target width / 4)")
    a("--layers", type=_int_at_least(1), default=4, help="drafter layers (default 4)")
    a("--intermediate-size", type=_int_at_least(1), default=None, help="drafter MLP width (default 4x width)")
    a("--loss", type=_loss_name, default="ce",
      help="ce: cross-entropy on the target's argmax (default; higher greedy acceptance), kl: KL(target || drafter) "
           "(higher acceptance when sampling)")
    a("--centroids", type=_int_at_least(0), default=0,
      help="ordered embeddings with this many token clusters (must divide the vocabulary; default 0: off)")
    a("--centroid-top-k", type=_int_at_least(1), default=None, help="clusters the head scores per step")
    a("--dtype", choices=("float32", "bfloat16"), default="float32", help="target compute and export dtype")
    a("--seed", type=_int_at_least(0), default=0, help="initialisation and data-order seed (default 0)")
    a("--log-every", type=_int_at_least(1), default=100, help="progress line every N steps")
    a("--overwrite", action="store_true", help="replace an existing --out directory")
    a("--checkpoint-every", type=_int_at_least(0), default=200,
      help="save the training state every N steps next to --out (in .NAME.train/); running the same "
           "command again resumes from it (default 200; 0: never)")
    return parser


def read_corpus(files: Iterable[str], tokenizer, vocab_size: int) -> np.ndarray:
    """Token ids of the files, each encoded with <bos>, concatenated (documents are packed)."""
    ids = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise TrainError(f"data file {path}: not found") from None
        except IsADirectoryError:
            raise TrainError(f"data file {path}: is a directory") from None
        except UnicodeDecodeError as e:
            raise TrainError(f"data file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise TrainError(f"data file {path}: cannot read ({e.strerror})") from None
        ids.extend(tokenizer.encode(text, add_bos=True))
    ids = np.asarray(ids, np.int64)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise TrainError(f"the tokenizer produced id {int(bad[0])} outside the target's vocabulary [0, {vocab_size})")
    return ids.astype(np.int32)


def window_batches(ids: np.ndarray, seq_len: int, batch_size: int, seed: int, bos: int | None = None):
    """An endless stream of batches [batch_size, seq_len] of windows drawn at random from the
    non-overlapping windows of `ids`. With `bos`, each window's first token is replaced by `bos`:
    a real target sees every sequence start with <bos>, and its hidden states without one are not
    what the drafter meets at inference."""
    n = len(ids) // seq_len
    if n == 0:
        raise TrainError(f"the data has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    windows = ids[: n * seq_len].reshape(n, seq_len)
    if bos is not None:  # the window's first token becomes <bos> (no <bos><bos> where a document starts)
        windows = windows.copy()
        windows[:, 0] = bos
    rng = np.random.default_rng(seed)
    return (windows[rng.integers(0, n, batch_size)] for _ in iter(int, 1))


def _check_args(args) -> None:
    checks = [("steps", 1), ("draft_len", 1), ("batch_size", 1), ("seq_len", 2), ("layers", 1), ("log_every", 1)]
    for name, lo in checks:
        value = getattr(args, name)
        if not isinstance(value, int) or value < lo:
            raise TrainError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {value!r}")
    for name in ("hidden_size", "intermediate_size", "centroid_top_k"):
        value = getattr(args, name, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise TrainError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if not (isinstance(args.lr, (int, float)) and args.lr > 0 and math.isfinite(args.lr)):
        raise TrainError(f"--lr must be a finite number > 0, got {args.lr!r}")
    if args.loss not in LOSSES:
        raise TrainError(f"--loss must be one of {', '.join(LOSSES)}, got {args.loss!r}")
    if not os.path.isdir(args.target):
        raise TrainError(f"--target {args.target}: not a checkpoint directory")
    for path in args.data:
        if not os.path.isfile(path):
            raise TrainError(f"data file {path}: " + ("is a directory" if os.path.isdir(path) else "not found"))
        if not os.access(path, os.R_OK):
            raise TrainError(f"data file {path}: not readable")
    if getattr(args, "centroid_top_k", None) is not None and not args.centroids:
        raise TrainError("--centroid-top-k needs --centroids")
    if not isinstance(args.seed, int) or args.seed < 0:
        raise TrainError(f"--seed must be an integer >= 0, got {args.seed!r}")
    _check_out(args)


def _check_out(args) -> None:
    """Before any training: --out can be written, and replacing it (--overwrite) destroys neither the
    target nor the data, nor a directory that is not a checkpoint."""
    out = os.path.realpath(args.out)
    inside = lambda path: os.path.commonpath([out, os.path.realpath(path)]) == out
    if inside(args.target) or any(inside(p) for p in args.data):
        raise TrainError(f"--out {args.out}: would replace the target or the data; choose another directory")
    from gemma4_jax.export import check_destination

    try:
        check_destination(out, args.overwrite)
    except FileExistsError as e:
        hint = "" if args.overwrite else " (pass --overwrite to replace a checkpoint directory)"
        raise TrainError(f"--out: {e}{hint}") from None
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f"--out {args.out}: cannot create it ({parent} is not a writable directory)")


def run_train_drafter(args: argparse.Namespace) -> int:
    """Runs `train-drafter` with parsed `args` (see add_train_drafter_args). Returns the exit code:
    0, or 2 after a one-line message for a bad argument or input."""
    try:
        _train_drafter(args)
    except TrainError as e:
        print(f"gemma4-jax train-drafter: error: {e}", file=sys.stderr)
        return 2
    return 0


def _train_drafter(args) -> str:
    import gemma4_jax
    from gemma4_jax import export

    _check_args(args)
    try:
        from gemma4_jax.tokenizer import load_tokenizer
    except ImportError as e:
        raise TrainError(f"no tokenizer support available ({e})") from None
    try:
        target = gemma4_jax.load(args.target, dtype=args.dtype)
    except (ValueError, OSError) as e:  # ConfigError / CheckpointError name the file
        raise TrainError(str(e)) from None
    if not isinstance(target, gemma4_jax.Model):
        raise TrainError(f"--target {args.target}: is a drafter checkpoint; pass the target model")
    try:
        tokenizer = load_tokenizer(args.target)
    except Exception as e:  # sentencepiece / tokenizers raise their own types on a corrupt file
        raise TrainError(f"--target {args.target}: cannot load its tokenizer ({e})") from None
    tcfg = target.config
    if args.seq_len > tcfg.max_position_embeddings:
        raise TrainError(f"--seq-len {args.seq_len} exceeds the target's max_position_embeddings "
                         f"{tcfg.max_position_embeddings}")
    try:
        dcfg = drafter_config_for(tcfg, hidden_size=args.hidden_size or max(8, tcfg.hidden_size // 4),
                                  num_layers=args.layers, intermediate_size=args.intermediate_size,
                                  num_centroids=args.centroids, centroid_top_k=args.centroid_top_k)
    except ValueError as e:
        raise TrainError(str(e)) from None
    ids = read_corpus(args.data, tokenizer, tcfg.vocab_size)
    batches = window_batches(ids, args.seq_len, args.batch_size, args.seed, bos=tokenizer.bos_id)
    print(f"train-drafter: {len(ids)} tokens from {len(args.data)} file(s); drafter {dcfg.text.num_layers} layers x "
          f"{dcfg.text.hidden_size} ({params_lib.count(drafter_lib.declare(dcfg)):,} parameters), K={args.draft_len}, "
          f"loss {args.loss}", file=sys.stderr)

    def log(step, loss, metrics, seconds):
        agree = " ".join(f"{a:.2f}" for a in metrics["agree"])
        print(f"step {step + 1}/{args.steps}  loss {loss:.4f}  agreement per draft step [{agree}]  {seconds:.0f}s",
              file=sys.stderr)

    checkpoints = None
    if getattr(args, "checkpoint_every", 0):
        checkpoints = Checkpoints(_progress_dir(args.out), args.checkpoint_every, _run_options(args))
        done = checkpoints.latest_step()
        if done:
            print(f"train-drafter: resuming from step {done} of {args.steps} ({checkpoints.directory})",
                  file=sys.stderr)
    dparams = distill(target.params, tcfg, dcfg, batches, steps=args.steps, lr=args.lr, seed=args.seed,
                      draft_len=args.draft_len, loss=args.loss, dtype=args.dtype, on_step=log,
                      log_every=args.log_every, checkpoints=checkpoints)
    try:
        out = export.export_drafter(args.out, dcfg, dparams, generation_config=target.generation_config,
                                    num_assistant_tokens=args.draft_len,
                                    extra_files=export.tokenizer_files(args.target), overwrite=args.overwrite)
    except (FileExistsError, OSError) as e:
        raise TrainError(f"--out {args.out}: cannot write ({e})") from None
    if checkpoints is not None:
        checkpoints.remove()
    print(out)
    return out


def _progress_dir(out: str) -> str:
    """Where train-drafter keeps its progress: a hidden sibling of --out."""
    parent, base = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{base}.train")


def _run_options(args) -> dict:
    """What makes two train-drafter runs the same run (a resumed one must match)."""
    keys = ("steps", "draft_len", "batch_size", "seq_len", "lr", "hidden_size", "layers", "intermediate_size",
            "loss", "centroids", "centroid_top_k", "dtype", "seed")
    return {"target": os.path.realpath(args.target), "data": [os.path.realpath(d) for d in args.data],
            **{k: getattr(args, k, None) for k in keys}}


def train_drafter_cli(argv: Sequence[str] | None = None) -> int:
    """`gemma4-jax train-drafter ...` as a function of its arguments; returns the exit code."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2, no usage dump
            raise TrainError(message)

    parser = add_train_drafter_args(Parser(prog="gemma4-jax train-drafter"))
    try:
        args = parser.parse_args(argv)
    except TrainError as e:
        print(f"gemma4-jax train-drafter: error: {e}", file=sys.stderr)
        return 2
    return run_train_drafter(args)
