import os
import sys

# Eight fake CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_target(tmp_path_factory):
    """Saves (once per session) a tiny random HF model and returns (torch model, checkpoint dir)."""
    cache = {}

    def get(name: str, kind: str = "causal"):
        if (name, kind) not in cache:
            model = hf_models.causal_lm(name) if kind == "causal" else hf_models.conditional_generation(name)
            path = tmp_path_factory.mktemp(f"{name}_{kind}")
            model.save_pretrained(path)
            cache[name, kind] = (model, str(path))
        return cache[name, kind]

    return get


@pytest.fixture(scope="session")
def loaded(hf_target):
    """Our model loaded from the saved checkpoint, per (name, dtype)."""
    import gemma4_jax

    cache = {}

    def get(name: str, dtype: str = "float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = gemma4_jax.load(hf_target(name)[1], dtype=dtype)
        return cache[name, dtype]

    return get


def prompts(batch: int, length: int, vocab: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))
