"""The user-facing model object and `load`."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma4_jax import checkpoint, config as config_lib, drafter as drafter_lib, model as model_lib
from gemma4_jax import params as params_lib, sharding

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Everything of a multimodal checkpoint that is not the text decoder: deliberately not loaded.
_NON_TEXT = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
             "model.vision_embedder.", "model.audio_embedder.", "lm_head.")


def resolve_dtype(dtype) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use 'float32' or 'bfloat16' (float16 overflows "
                         "Gemma activations)")
    return jnp.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True, eq=False)
class _Loaded:
    config: config_lib.Config | drafter_lib.DrafterConfig
    params: dict
    path: str | None = None
    mesh: Mesh | None = None
    generation_config: dict = dataclasses.field(default_factory=dict)


class Model(_Loaded):
    """A loaded Gemma 4 text model: static `config`, parameter pytree `params`."""

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embed"].dtype

    def logits(self, tokens) -> np.ndarray:
        """Full forward over token ids [B, T] (or [T]); float32 numpy logits [B, T, V]. For checks;
        generation uses the cached step."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [batch, length] array, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        bad = (tokens < 0) | (tokens >= self.config.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(tokens[bad][0])} is outside the vocabulary [0, {self.config.vocab_size})")
        tokens = jnp.asarray(tokens, jnp.int32)
        if self.mesh is None:
            return np.asarray(_full_logits(self.params, self.config, tokens))
        tokens = jax.device_put(tokens, sharding.batch_sharding(self.mesh, tokens.shape))
        with jax.set_mesh(self.mesh):
            return np.asarray(_full_logits(self.params, self.config, tokens))


@functools.partial(jax.jit, static_argnums=1)
def _full_logits(params, cfg, tokens):
    hidden, _ = model_lib.forward(params, cfg, tokens)
    return model_lib.logits(params, cfg, hidden)


class Drafter(_Loaded):
    """A loaded MTP drafter ("assistant" checkpoint); pass it to `generate(..., drafter=...)`."""


def load(path: str, *, dtype="bfloat16", mesh: Mesh | None = None) -> Model | Drafter:
    """Loads a Hugging Face Gemma 4 checkpoint directory (config.json + safetensors).

    Targets: Gemma4ForConditionalGeneration (text decoder only; vision/audio towers are skipped),
    Gemma4ForCausalLM and the unified 12B model's text decoder -> `Model`. Drafters
    (`gemma4_assistant`, `gemma4_unified_assistant`) -> `Drafter`. With `mesh`, each parameter is
    placed straight into its sharding (see sharding.RULES).
    """
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: not a checkpoint directory")
    dt = resolve_dtype(dtype)
    cfg_path = os.path.join(path, "config.json")
    raw = config_lib.read_json(cfg_path)
    ckpt = checkpoint.Checkpoint(path)
    gen_path = os.path.join(path, "generation_config.json")
    gen = config_lib.read_json(gen_path) if os.path.exists(gen_path) else {}
    if drafter_lib.is_drafter(raw):
        dcfg = drafter_lib.drafter_config(raw, cfg_path)
        decl = drafter_lib.declare(dcfg)
        rules, ignorable = drafter_lib.rules(dcfg)
        skip = ()
    else:
        dcfg = config_lib.load_config(cfg_path)
        prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in ckpt.keys()) \
            else "model."
        decl = params_lib.declare(dcfg)
        rules, ignorable = checkpoint.target_rules(dcfg, prefix)
        skip = _NON_TEXT if raw.get("model_type") in ("gemma4", "gemma4_unified") else ("lm_head.",)
    shardings = sharding.param_shardings(decl, mesh) if mesh is not None else None
    params = checkpoint.convert(ckpt, rules, ignorable, skip, decl, shardings, dt, where=path)
    cls = Drafter if isinstance(dcfg, drafter_lib.DrafterConfig) else Model
    return cls(config=dcfg, params=params, path=path, mesh=mesh, generation_config=gen)
