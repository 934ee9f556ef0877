"""The multi-token-prediction drafter ("assistant" checkpoints) of Gemma 4.

A small decoder whose layers own no K/V: its sliding and full layers attend over the target's K/V
of the last layer of each kind that computes K/V (the "store" layers on KV-sharing targets, the
last sliding / full layers otherwise). One draft step:

  x = [target_embed(last token), target hidden or previous carry] @ pre     [B, 1, d]
  decoder layers at one constant position p (the round's), reading target K/V of positions < p
  h = final_norm(x);  carry = h @ post;  logits = head(h)  (tied, or centroid-masked; no soft-cap)

Visibility is clean: position p sees only target keys at positions < p, committed ones. Sliding
layers see the last `sliding_window + 1` of them, as the reference's flipped mask does.
transformers 5.23.0 instead shows the drafter the K/V of rejected drafts after a partial
acceptance (see README); outputs of lossless decoding do not depend on the difference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemma4_jax import cache as kv
from gemma4_jax import config as config_lib
from gemma4_jax import model, params as params_lib
from gemma4_jax.config import FULL, SLIDING, Config, ConfigError
from gemma4_jax.params import Param

ASSISTANT_TYPES = {"gemma4_assistant": "gemma4_text", "gemma4_unified_assistant": "gemma4_unified_text"}


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    text: Config  # every layer reads the target's K/V (num_kv_shared_layers == num_layers)
    backbone_hidden_size: int
    ordered_embeddings: bool = False
    num_centroids: int = 0
    centroid_top_k: int = 0


def is_drafter(raw: dict) -> bool:
    return raw.get("model_type") in ASSISTANT_TYPES


def drafter_config(raw: dict, where: str) -> DrafterConfig:
    """DrafterConfig from an assistant checkpoint's config.json dict."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: model_type {raw.get('model_type')!r} needs a text_config object")
    text_type = text.get("model_type", ASSISTANT_TYPES[raw["model_type"]])
    for field in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp"):
        if text.get(field):
            raise ConfigError(f"{where}: text_config.{field} must be 0/false for a drafter, got {text[field]!r}")
    try:
        cfg = config_lib.from_hf_text({**text, "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0},
                                      text_type, where)
        backbone = int(raw.get("backbone_hidden_size", 1536 if raw["model_type"] == "gemma4_assistant" else 3840))
    except KeyError as e:
        raise ConfigError(f"{where}: missing field {e.args[0]!r}") from None
    cfg = dataclasses.replace(cfg, num_kv_shared_layers=cfg.num_layers)
    ordered = bool(raw.get("use_ordered_embeddings", False))
    C = int(raw.get("num_centroids", 2048)) if ordered else 0
    if ordered and (C <= 0 or cfg.vocab_size % C):
        raise ConfigError(f"{where}: num_centroids={C} must divide vocab_size={cfg.vocab_size}")
    top = int(raw.get("centroid_intermediate_top_k", 32)) if ordered else 0
    if ordered and not 0 < top <= C:
        raise ConfigError(f"{where}: centroid_intermediate_top_k={top} must be in [1, num_centroids={C}]")
    return DrafterConfig(text=cfg, backbone_hidden_size=backbone, ordered_embeddings=ordered,
                         num_centroids=C, centroid_top_k=top)


def declare(dcfg: DrafterConfig) -> dict:
    cfg = dcfg.text
    d, Dt = cfg.hidden_size, dcfg.backbone_hidden_size
    tree = params_lib.declare(cfg)  # embed (the tied head), final_norm, layers with q/o only
    tree["pre"] = Param((2 * Dt, d), (None, "embed"))
    tree["post"] = Param((d, Dt), ("embed", None))
    tree["centroids"] = Param((d, dcfg.num_centroids), ("embed", None)) if dcfg.ordered_embeddings else None
    tree["ordering"] = Param((cfg.vocab_size,), (None,), "arange", "int32") if dcfg.ordered_embeddings else None
    return tree


def rules(dcfg: DrafterConfig):
    from gemma4_jax.checkpoint import _same, _t, target_rules

    table, ignorable = target_rules(dcfg.text, "model.")
    d, Dt = dcfg.text.hidden_size, dcfg.backbone_hidden_size
    table["pre_projection.weight"] = ((d, 2 * Dt), [(("pre",), _t)])
    table["post_projection.weight"] = ((Dt, d), [(("post",), _t)])
    if dcfg.ordered_embeddings:
        table["masked_embedding.centroids.weight"] = ((dcfg.num_centroids, d), [(("centroids",), _t)])
        table["masked_embedding.token_ordering"] = ((dcfg.text.vocab_size,), [(("ordering",), _same)])
    return table, ignorable | {"lm_head.weight"}


def check_compatible(dcfg: DrafterConfig, target: Config, where: str = "drafter") -> None:
    """The drafter reads the target's embedding, hidden state and K/V: their shapes must agree."""
    d = dcfg.text
    pairs = [
        ("backbone_hidden_size", dcfg.backbone_hidden_size, "hidden_size", target.hidden_size),
        ("vocab_size", d.vocab_size, "vocab_size", target.vocab_size),
        ("head_dim", d.head_dim, "head_dim", target.head_dim),
        ("global_head_dim", d.global_head_dim, "global_head_dim", target.global_head_dim),
    ]
    for kind in set(d.layer_types):
        if kind not in target.kv_layers:
            raise ValueError(f"{where}: drafter has {kind} layers but the target has none to read K/V from")
        spec = target.layers[target.kv_layers[kind]]
        ours = d.num_kv_heads if kind == SLIDING else d.num_global_kv_heads
        name = "num_key_value_heads" if kind == SLIDING else "num_global_key_value_heads"
        pairs.append((name, ours, f"KV heads of target layer {spec.index} ({kind})", spec.num_kv_heads))
    for ours_name, ours, theirs_name, theirs in pairs:
        if ours != theirs:
            raise ValueError(f"{where}: drafter {ours_name}={ours} does not match the target's {theirs_name}="
                             f"{theirs}; this drafter belongs to another target")
    if (d.rope_sliding, d.rope_full) != (target.rope_sliding, target.rope_full):
        raise ValueError(f"{where}: drafter rope_parameters differ from the target's")


def target_kv(target: Config, cache: kv.KVCache) -> dict:
    """Per kind, the target K/V the drafter reads: (k, v, slot positions)."""
    return {kind: (cache.k[i], cache.v[i], cache.pos[kind]) for kind, i in target.kv_layers.items()}


def context(dcfg: DrafterConfig, pos: jax.Array, views: dict, dtype) -> tuple[dict, dict]:
    """What the trunk needs besides its input, for query positions pos [B, T] over `views` (from
    `target_kv`): per kind the RoPE tables and the attention parts [(k, v, mask [B, T, S])]. Query
    t sees target keys at positions < pos[b, t] (sliding layers: the last `sliding_window + 1` of
    them). The K draft steps of a round share one position, so they share one context."""
    cfg = dcfg.text
    tables = {SLIDING: model.rope_tables(pos, cfg.head_dim, cfg.rope_sliding, dtype),
              FULL: model.rope_tables(pos, cfg.global_head_dim, cfg.rope_full, dtype)}
    parts = {}
    q = pos[:, :, None]
    for kind, (k, v, kpos) in views.items():
        kp = kpos[:, None, :]
        mask = (kp >= 0) & (kp < q)  # [B, T, S]
        if kind == SLIDING:
            mask &= kp >= q - 1 - cfg.sliding_window
        parts[kind] = [(k, v, mask)]
    return tables, parts


def hidden(dparams: dict, dcfg: DrafterConfig, x: jax.Array, pos: jax.Array, views: dict, ctx=None):
    """The drafter's trunk at many query positions at once: x [B, T, 2*Dt] = [target embedding,
    hidden or carry] per query, pos [B, T] each query's round position, views from `target_kv`
    (`ctx`: their `context`, when already computed). Queries do not see each other, so T
    independent draft steps run in one pass (training feeds every position of a sequence at once).
    Returns (post-norm h [B, T, d], carry [B, T, Dt])."""
    cfg = dcfg.text
    x = jnp.einsum("BTC,CD->BTD", x.astype(dparams["pre"].dtype), dparams["pre"])
    tables, parts = ctx if ctx is not None else context(dcfg, pos, views, x.dtype)
    for i, spec in enumerate(cfg.layers):
        cos, sin = tables[spec.kind]
        with jax.named_scope(f"draft_layer_{i}"):
            x = model.decoder_layer(dparams["layers"][i], cfg, x, cos, sin, lambda h, kind=spec.kind: parts[kind])
    h = model.rms_norm(x, dparams["final_norm"], cfg.rms_norm_eps)
    return h, jnp.einsum("BTD,DC->BTC", h, dparams["post"])


def forward(dparams: dict, dcfg: DrafterConfig, x: jax.Array, pos: jax.Array, views: dict, ctx=None):
    """Draft steps at query positions pos [B, T] (see `hidden`). Returns (float32 logits [B, T, V],
    carry [B, T, Dt])."""
    h, carry = hidden(dparams, dcfg, x, pos, views, ctx)
    return head(dparams, dcfg, h), carry


def step(dparams: dict, dcfg: DrafterConfig, x: jax.Array, pos: jax.Array, views: dict, ctx=None):
    """One draft step. x [B, 1, 2*Dt] = [target embedding, hidden or carry]; pos [B] the round's
    position; views from `target_kv`; ctx (optional) = context(dcfg, pos[:, None], views, dtype),
    computed once per round. Returns (float32 logits [B, 1, V], carry [B, 1, Dt])."""
    return forward(dparams, dcfg, x, pos[:, None], views, ctx)


def head(dparams: dict, dcfg: DrafterConfig, h: jax.Array) -> jax.Array:
    """Tied LM head, or with ordered embeddings the centroid-masked head: only the tokens of the
    top-k centroids get exact logits, every other token gets (smallest selected logit - 1). The
    reference takes that minimum over the whole batch; we take it per row, so rows stay independent."""
    E = dparams["embed"]
    if not dcfg.ordered_embeddings:
        return jnp.einsum("BTD,VD->BTV", h, E, preferred_element_type=jnp.float32)
    B, T, _ = h.shape
    C, V = dcfg.num_centroids, dcfg.text.vocab_size
    scores = jnp.einsum("BTD,DC->BTC", h, dparams["centroids"])
    top = jax.lax.top_k(scores, dcfg.centroid_top_k)[1]
    ids = dparams["ordering"].reshape(C, V // C)[top].reshape(B, T, -1)  # [B, T, top_k * V/C]
    sel = jnp.einsum("BTD,BTSD->BTS", h, E[ids], preferred_element_type=jnp.float32)
    fill = jnp.min(sel, axis=-1, keepdims=True) - 1.0
    out = jnp.broadcast_to(fill, (B, T, V))
    b, t = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
    return out.at[b, t, ids].set(sel)
