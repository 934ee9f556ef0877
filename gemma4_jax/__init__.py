"""Gemma 4 in pure-functional JAX."""

from gemma4_jax.api import Drafter, Model, load
from gemma4_jax.checkpoint import CheckpointError
from gemma4_jax.config import Config, ConfigError, load_config

__all__ = ["Drafter", "Model", "load", "Config", "ConfigError", "CheckpointError", "load_config"]
__version__ = "0.1.0"
