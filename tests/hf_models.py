"""Tiny random Gemma 4 models built with transformers (the numerical reference) and saved in HF format.

HF initialises norm weights, layer_scalar and router scales to one, which would hide bugs that
confuse `w` with `1 + w` or skip a scale: `randomize` perturbs every one of them.
"""

from __future__ import annotations

import torch

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
    global_head_dim=32, sliding_window=8, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
    initializer_range=0.05,
)
S, F = "sliding_attention", "full_attention"

TARGETS = {
    # PLE, KV sharing (store layers 2/3), double-wide MLP on shared layers, one KV head.
    "e2b": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=1,
                num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size_per_layer_input=512,
                use_double_wide_mlp=True),
    # PLE, KV sharing over a longer shared suffix, two KV heads, no double-wide MLP.
    "e4b": dict(num_hidden_layers=8, layer_types=[S, S, S, F, S, S, S, F], num_key_value_heads=2,
                num_kv_shared_layers=3, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512),
    # MoE in parallel with the dense MLP, k_eq_v full layers with their own KV-head count, no PLE.
    "moe": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=2,
                attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True, num_experts=8,
                top_k_experts=2, moe_intermediate_size=32, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0),
    # Dense 31B-like: k_eq_v, global KV heads, no PLE, no sharing.
    "dense": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=2,
                  attention_k_eq_v=True, num_global_key_value_heads=1, hidden_size_per_layer_input=0,
                  vocab_size_per_layer_input=0),
}


def text_config(name: str, **over):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{**BASE, **TARGETS[name], **over})


@torch.no_grad()
def randomize(model, seed: int = 0):
    """Perturbs the parameters HF initialises to one (norms, layer_scalar, router scales)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("norm.weight", "layernorm.weight", "layer_scalar", "router.scale", "per_expert_scale")) \
                or "layernorm_" in name:
            t.copy_(t.new_empty(t.shape).uniform_(0.5, 1.5, generator=g))


def causal_lm(name: str, seed: int = 0, **over):
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(text_config(name, **over)).eval()
    randomize(model, seed)
    return model


def conditional_generation(name: str, seed: int = 0):
    """A Gemma4ForConditionalGeneration with tiny vision and audio towers."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4VisionConfig

    torch.manual_seed(seed)
    cfg = Gemma4Config(
        text_config=text_config(name).to_dict(),
        vision_config=Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16).to_dict(),
        audio_config=Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       output_proj_dims=BASE["hidden_size"]).to_dict(),
    )
    model = Gemma4ForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def reference_logits(model, tokens):
    """Full-forward logits of the reference, float32 numpy [B, T, V]. output_hidden_states=True works
    around 5.23.0's crash in the no-cache forward of KV-shared models without PLE."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    return out.logits.float().numpy()


DRAFTER_BASE = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    head_dim=16, global_head_dim=32, sliding_window=8, layer_types=[S, S, S, F], rms_norm_eps=1e-6,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4,
    initializer_range=0.05,
)
# The drafter's KV-head counts must match its target's store layers.
DRAFTER_KV = {
    "e2b": dict(num_key_value_heads=1),
    "e4b": dict(num_key_value_heads=2),
    "moe": dict(num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1),
    "dense": dict(num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1),
}


def patch_all_reuse_drafter():
    """transformers 5.23.0 cannot build a drafter: `kv_sharing_modes` raises when every layer is
    KV-shared. The intended behaviour is that every drafter layer reuses the target's K/V."""
    from transformers import Gemma4TextConfig

    original = Gemma4TextConfig.kv_sharing_modes
    if getattr(original.fget, "patched", False):
        return

    def kv_sharing_modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    kv_sharing_modes.patched = True

    Gemma4TextConfig.kv_sharing_modes = property(kv_sharing_modes)


def assistant(target: str, seed: int = 0, ordered: bool = True, **over):
    """A Gemma4AssistantForCausalLM for the tiny `target`, randomized like the targets."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    patch_all_reuse_drafter()
    torch.manual_seed(seed)
    text = Gemma4TextConfig(**{**DRAFTER_BASE, **DRAFTER_KV[target], **over})
    cfg = Gemma4AssistantConfig(text_config=text.to_dict(), backbone_hidden_size=BASE["hidden_size"],
                                use_ordered_embeddings=ordered, num_centroids=16, centroid_intermediate_top_k=4)
    model = Gemma4AssistantForCausalLM(cfg).eval()
    randomize(model, seed)
    if ordered:
        g = torch.Generator().manual_seed(seed)
        model.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text_config.vocab_size, generator=g))
    model.generation_config.num_assistant_tokens = 4
    return model


UNIFIED = dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=2, attention_k_eq_v=True,
               num_global_key_value_heads=1)


def unified(kind: str = "causal", seed: int = 0):
    """The 12B unified model's text decoder (no PLE, no MoE): Gemma4UnifiedForCausalLM, or the
    multimodal Gemma4UnifiedForConditionalGeneration wrapper."""
    from transformers import (Gemma4UnifiedConfig, Gemma4UnifiedForCausalLM, Gemma4UnifiedForConditionalGeneration,
                              Gemma4UnifiedTextConfig)

    torch.manual_seed(seed)
    base = {k: v for k, v in BASE.items()}
    text = Gemma4UnifiedTextConfig(**{**base, **UNIFIED})
    if kind == "causal":
        model = Gemma4UnifiedForCausalLM(text)
    else:
        model = Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(text_config=text.to_dict()))
    model = model.eval()
    randomize(model, seed)
    return model
