"""The Gemma 4 text decoder as pure functions over parameter pytrees.

Dimension letters used in einsum strings and names:
  B batch, T query tokens, S key slots, D model width, F MLP width, N query heads, K KV heads,
  G query heads per KV head, H head dim, V vocabulary, L layers, E experts, P per-layer-input width.

Data flow of `forward` (one call serves a full forward, a prefill, a decode step or a verify block):
  tokens -> scaled embedding (+ per-layer inputs) -> layers -> final norm -> hidden
  `logits(params, cfg, hidden)` applies the tied head and the soft-cap.
Each layer attends over two parts: the cache as it was before this call, and this call's new K/V.
New K/V are committed to the cache after the last layer, so prefill blocks of any length work with
bounded sliding-window ring buffers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma4_jax import cache as kv
from gemma4_jax.config import FULL, SLIDING, Config, Rope

f32 = jnp.float32
NEG = -0.7 * float(jnp.finfo(f32).max)


def rms_norm(x: jax.Array, w: jax.Array | None, eps: float) -> jax.Array:
    # Gemma 4 scales by w (not 1 + w); fp32 inside, pow rather than rsqrt, as the reference.
    xf = x.astype(f32)
    y = xf * jnp.power(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps, -0.5)
    if w is not None:
        y = y * w.astype(f32)
    return y.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    # tanh-approximate GELU evaluated in fp32 and rounded once, as torch does on CPU for bf16.
    return jax.nn.gelu(x.astype(f32), approximate=True).astype(x.dtype)


def scale(x: jax.Array, s: float) -> jax.Array:
    # torch multiplies a bf16 tensor by a Python float in fp32 with one rounding; a weak-typed JAX
    # scalar would be rounded to bf16 first.
    return (x.astype(f32) * s).astype(x.dtype)


def rope_tables(pos: jax.Array, head_dim: int, rope: Rope, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, H] for absolute positions [B, T]. Proportional RoPE rotates only the first
    `fraction` of frequency pairs; the exponent still uses the full head dim."""
    pairs = head_dim // 2
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=f32) / head_dim))
    rotated = int(rope.fraction * head_dim // 2)
    inv = jnp.where(jnp.arange(pairs) < rotated, inv, 0.0) / rope.factor
    ang = pos.astype(f32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # Half-split ("NeoX") pairing (i, i + H/2); arithmetic in the activation dtype, as the reference.
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def embed(params: dict, cfg: Config, tokens: jax.Array) -> jax.Array:
    """Scaled token embedding [B, T, D]; sqrt(D) is rounded to the weight dtype first (bf16: 39.25
    for D=1536), as the reference."""
    table = params["embed"]
    return table[tokens] * jnp.asarray(math.sqrt(cfg.hidden_size), f32).astype(table.dtype)


def per_layer_inputs(params: dict, cfg: Config, tokens: jax.Array, x: jax.Array) -> jax.Array:
    """Per-layer embeddings [B, T, L, P]: a token-identity table plus a projection of the embedding."""
    p = params["ple"]
    tok = p["embed"][tokens] * jnp.asarray(math.sqrt(cfg.ple_dim), f32).astype(x.dtype)
    ctx = jnp.einsum("BTD,DLP->BTLP", x, p["proj"])
    ctx = rms_norm(scale(ctx, cfg.hidden_size**-0.5), p["norm"], cfg.rms_norm_eps)
    return scale(ctx + tok, 2.0**-0.5)


def attention(q: jax.Array, parts: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Grouped-query attention of q [B, T, N, H] over key parts (k, v [B, S, K, H], mask [B, T, S]),
    with one softmax across all parts. Scale 1.0 (q and k are RMS-normalised). Logits and softmax
    in fp32: head dims are 256/512 and Gemma 4 has no attention soft-cap. Returns [B, K, G, T, H]
    (N = K * G): the layout the dot produces, which the output projection contracts as is."""
    B, T, N, H = q.shape
    K = parts[0][0].shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    logits = []
    for k, _, mask in parts:
        s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=f32)
        logits.append(jnp.where(mask[:, None, None], s, NEG))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1).astype(q.dtype)
    out, start = 0.0, 0
    for k, v, _ in parts:
        S = k.shape[1]
        out = out + jnp.einsum("BKGTS,BSKH->BKGTH", probs[..., start:start + S], v, preferred_element_type=f32)
        start += S
    return out.astype(q.dtype)


def mlp(p: dict, x: jax.Array) -> jax.Array:
    h = gelu(jnp.einsum("BTD,DF->BTF", x, p["gate"])) * jnp.einsum("BTD,DF->BTF", x, p["up"])
    return jnp.einsum("BTF,FD->BTD", h, p["down"])


def moe(p: dict, cfg: Config, residual: jax.Array) -> jax.Array:
    """Routed experts, data parallel: each `data` shard routes and sorts its own tokens (a global
    sort would gather the whole batch onto every shard). Expert weights stay sharded over `model`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names or mesh.shape["data"] == 1 \
            or residual.shape[0] % mesh.shape["data"]:
        return _moe_local(p, cfg, residual)
    return jax.shard_map(lambda p, r: _moe_local(p, cfg, r), mesh=mesh, in_specs=(P(), P("data")),
                         out_specs=P("data"), axis_names={"data"}, check_vma=False)(p, residual)


def _moe_local(p: dict, cfg: Config, residual: jax.Array) -> jax.Array:
    """Routed experts. The router reads the raw post-attention residual (not the normed input); the
    experts read `pre_norm(residual)`. Tokens are sorted by expert for grouped matmuls."""
    B, T, D = residual.shape
    r = residual.reshape(B * T, D)
    z = rms_norm(r, None, cfg.rms_norm_eps) * p["router_scale"]
    z = scale(z, D**-0.5)
    probs = jax.nn.softmax(jnp.einsum("ND,DE->NE", z, p["router"]).astype(f32), axis=-1)
    w, idx = jax.lax.top_k(probs, cfg.top_k_experts)
    w = w / jnp.sum(w, axis=-1, keepdims=True) * p["expert_scale"].astype(f32)[idx]

    x = rms_norm(r, p["pre_norm"], cfg.rms_norm_eps)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    token = order // cfg.top_k_experts
    sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    xs = x[token]
    h = gelu(jax.lax.ragged_dot(xs, p["gate"], sizes)) * jax.lax.ragged_dot(xs, p["up"], sizes)
    y = jax.lax.ragged_dot(h, p["down"], sizes, preferred_element_type=f32)
    y = y * w.reshape(-1)[order][:, None]
    out = jnp.zeros((B * T, D), f32).at[token].add(y)  # fp32 sum of the top-k contributions
    return out.astype(residual.dtype).reshape(B, T, D)


def _masks(cfg: Config, pos: jax.Array, cache: kv.KVCache | None) -> dict:
    """Per kind: (mask over the old cache [B, T, S] or None, mask over the new block [B, T, T]).
    Sliding: a query sees W keys including itself."""
    T = pos.shape[1]
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    out = {}
    for kind in set(cfg.layer_types):
        new = j <= i
        if kind == SLIDING:
            new &= i - j < cfg.sliding_window
        new = jnp.broadcast_to(new, (pos.shape[0], T, T))
        old = None
        if cache is not None:
            kpos = cache.pos[kind][:, None, :]
            old = (kpos >= 0) & (kpos < cache.length[:, None, None])
            if kind == SLIDING:
                old &= pos[:, :, None] - kpos < cfg.sliding_window
        out[kind] = (old, new)
    return out


def decoder_layer(p: dict, cfg: Config, x: jax.Array, cos: jax.Array, sin: jax.Array, kv_parts,
                  ple_i: jax.Array | None = None):
    """One decoder layer (target or drafter). `kv_parts(h)` returns the attention parts
    [(k, v, mask), ...] for the normed input h: the caller owns K/V production, caching and sharing."""
    eps, a = cfg.rms_norm_eps, p["attn"]
    residual = x
    h = rms_norm(x, p["attn_norm"], eps)
    q = apply_rope(rms_norm(jnp.einsum("BTD,DNH->BTNH", h, a["q"]), a["q_norm"], eps), cos, sin)
    parts = kv_parts(h)
    out = attention(q, parts)
    K, G = out.shape[1], out.shape[2]
    o = jnp.einsum("BKGTH,KGHD->BTD", out, a["o"].reshape(K, G, *a["o"].shape[1:]))
    x = residual + rms_norm(o, p["post_attn_norm"], eps)

    residual = x
    m = mlp(p["mlp"], rms_norm(x, p["pre_mlp_norm"], eps))
    if p["moe"] is not None:
        e = moe(p["moe"], cfg, residual)
        m = rms_norm(m, p["moe"]["post_norm_dense"], eps) + rms_norm(e, p["moe"]["post_norm_experts"], eps)
    x = residual + rms_norm(m, p["post_mlp_norm"], eps)

    if ple_i is not None:
        g = gelu(jnp.einsum("BTD,DP->BTP", x, p["ple"]["gate"])) * ple_i
        x = x + rms_norm(jnp.einsum("BTP,PD->BTD", g, p["ple"]["proj"]), p["ple"]["norm"], eps)
    return x * p["scalar"]  # layer_scalar scales the whole stream, residual included


def _decode(params: dict, cfg: Config, tokens: jax.Array, pos: jax.Array, past: kv.KVCache | None):
    """The decoder over tokens [B, T] at positions [B, T], attending over `past` (if any) and the
    block itself. Returns post-norm hidden states and each producing layer's new K/V."""
    x = embed(params, cfg, tokens)
    ple = per_layer_inputs(params, cfg, tokens, x) if cfg.ple_dim else None
    tables = {SLIDING: rope_tables(pos, cfg.head_dim, cfg.rope_sliding, x.dtype),
              FULL: rope_tables(pos, cfg.global_head_dim, cfg.rope_full, x.dtype)}
    masks = _masks(cfg, pos, past)
    eps = cfg.rms_norm_eps
    new_k, new_v = [None] * cfg.num_layers, [None] * cfg.num_layers

    for i, spec in enumerate(cfg.layers):
        a = params["layers"][i]["attn"]
        cos, sin = tables[spec.kind]
        old_mask, new_mask = masks[spec.kind]

        def kv_parts(h, i=i, spec=spec, a=a, cos=cos, sin=sin, old_mask=old_mask, new_mask=new_mask):
            if spec.owns_kv:
                k_raw = jnp.einsum("BTD,DKH->BTKH", h, a["k"])
                # k_eq_v full layers: V is the k_proj output, normed without weight and not rotated.
                v_raw = jnp.einsum("BTD,DKH->BTKH", h, a["v"]) if spec.has_v else k_raw
                new_k[i] = apply_rope(rms_norm(k_raw, a["k_norm"], eps), cos, sin)
                new_v[i] = rms_norm(v_raw, None, eps)  # v_norm has no weight
            src = spec.kv_source
            parts = [(new_k[src], new_v[src], new_mask)]
            if past is not None:
                parts.insert(0, (past.k[src], past.v[src], old_mask))
            return parts

        with jax.named_scope(f"layer_{i}"):
            x = decoder_layer(params["layers"][i], cfg, x, cos, sin, kv_parts,
                              ple[:, :, i] if ple is not None else None)

    return rms_norm(x, params["final_norm"], eps), new_k, new_v


def _positions(start: jax.Array, steps: int) -> jax.Array:
    return start[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]


def forward(params: dict, cfg: Config, tokens: jax.Array, cache: kv.KVCache | None = None,
            num_new: jax.Array | None = None) -> tuple[jax.Array, kv.KVCache | None]:
    """Runs the decoder over tokens [B, T] that follow what `cache` holds (or start a sequence when
    `cache` is None). Returns the post-final-norm hidden states [B, T, D] and the updated cache.

    `num_new` [B] (default T): row b commits only its first num_new[b] tokens; the rest of its
    block is padding that valid tokens never see.
    """
    B, T = tokens.shape
    start = cache.length if cache is not None else jnp.zeros((B,), jnp.int32)
    hidden, new_k, new_v = _decode(params, cfg, tokens, _positions(start, T), cache)
    if cache is not None:
        cache = kv.commit(cache, new_k, new_v, jnp.full((B,), T, jnp.int32) if num_new is None else num_new)
    return hidden, cache


def prefill(params: dict, cfg: Config, tokens: jax.Array, cache: kv.KVCache,
            num_new: jax.Array) -> tuple[jax.Array, kv.KVCache]:
    """`forward` for the first block of an empty cache: attends over the block only (no scores
    against empty cache slots) and commits each row's first num_new[b] tokens."""
    B, T = tokens.shape
    hidden, new_k, new_v = _decode(params, cfg, tokens, _positions(jnp.zeros((B,), jnp.int32), T), None)
    return hidden, kv.commit(cache, new_k, new_v, num_new)


def logits(params: dict, cfg: Config, hidden: jax.Array) -> jax.Array:
    """Tied LM head on post-norm hidden states, fp32, with the final soft-cap."""
    out = jnp.einsum("BTD,VD->BTV", hidden, params["embed"], preferred_element_type=f32)
    c = cfg.final_logit_softcapping
    return c * jnp.tanh(out / c) if c else out
