"""Helpers that edit saved HF checkpoints in place (for the bad-input tests)."""

import json
import os

import numpy as np
import safetensors.numpy

WEIGHTS = "model.safetensors"


def read_tensors(path: str, file: str = WEIGHTS) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(os.path.join(path, file))


def write_tensors(path: str, tensors: dict[str, np.ndarray], file: str = WEIGHTS):
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                os.path.join(path, file), metadata={"format": "pt"})


def edit_tensors(path: str, fn):
    tensors = read_tensors(path)
    fn(tensors)
    write_tensors(path, tensors)


def edit_config(path: str, fn):
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    fn(raw)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
