"""Parameter counts of the released Gemma 4 text decoders, from the vendored config.json fixtures.

Nothing is allocated: the parameter tree is built with `jax.eval_shape` over the initialiser, so
the 31B model is counted in well under a second on a laptop.

    python benchmarks/param_counts.py          # our text-decoder counts next to the published figures
    python benchmarks/param_counts.py --hf     # also the full multimodal model of transformers, built
                                               # on torch's meta device (needs the test extra)

Columns: `text` = every parameter of our text decoder (tied LM head counted once, layer_scalar
included); `embedding` = main token embedding + PLE embedding table; `effective` = text minus the
PLE embedding table (Google's definition of the "E" in E2B/E4B); `active/token` (MoE only) = text
minus the experts that a token does not use, i.e. dense parts + top_k/num_experts of the expert
weights; `bf16` = bytes of the text decoder in bfloat16.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp

from gemma4_jax import load_config, params

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "fixtures", "configs")
# (fixture, published figure as announced; see benchmarks/SIZES.md for what those figures include)
MODELS = [
    ("gemma-4-E2B-it", "5.1B total / 2.3B effective"),
    ("gemma-4-E4B-it", "8B total / 4.5B effective"),
    ("gemma-4-26B-A4B-it", "25.2B total / 3.8B active"),
    ("gemma-4-31B-it", "30.7B"),
    ("gemma-4-12B-it", "(none quoted; name says 12B)"),
]


def _n(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def breakdown(cfg) -> dict:
    """Parameter counts of one text decoder, from abstract (never allocated) parameters."""
    decl = params.declare(cfg)
    shapes = jax.eval_shape(functools.partial(params.init, decl, dtype=jnp.bfloat16), jax.random.key(0))
    total = _n(shapes)
    ple_table = _n(shapes["ple"]["embed"]) if shapes["ple"] is not None else 0
    experts = sum(_n([layer["moe"][k] for k in ("gate", "up", "down")])
                  for layer in shapes["layers"] if layer["moe"] is not None)
    active = None
    if cfg.moe:
        active = total - ple_table - experts + experts * cfg.top_k_experts // cfg.num_experts
    return dict(
        layers=cfg.num_layers,
        total=total,
        embedding=_n(shapes["embed"]) + ple_table,
        ple_table=ple_table,
        effective=total - ple_table,
        experts=experts,
        active=active,
        bf16_bytes=sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)),
    )


def hf_breakdown(path: str) -> dict:
    """Parameters of transformers' full multimodal model, per top-level module (meta device)."""
    import collections
    import json

    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    with open(path) as f:
        cls = getattr(transformers, json.load(f)["architectures"][0])
    with torch.device("meta"):
        model = cls(cfg)
    parts = collections.Counter()
    for name, p in model.named_parameters():
        parts[name.split(".")[1] if name.startswith("model.") else name.split(".")[0]] += p.numel()
    return dict(parts)


def _b(n) -> str:
    return "—" if n is None else f"{n / 1e9:.3f}B"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", action="store_true", help="also count transformers' multimodal model (meta device)")
    args = ap.parse_args(argv)

    rows = []
    for name, published in MODELS:
        path = os.path.join(FIXTURES, name + ".json")
        rows.append((name, published, path, breakdown(load_config(path))))

    print("| model | layers | text | embedding (main + PLE) | effective | active/token | bf16 | published |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, published, _, r in rows:
        print(f"| {name} | {r['layers']} | {_b(r['total'])} | {_b(r['embedding'])} | {_b(r['effective'])} "
              f"| {_b(r['active'])} | {r['bf16_bytes'] / 2**30:.2f} GiB | {published} |")
    print()
    print("exact text-decoder counts:")
    for name, _, _, r in rows:
        extra = f", experts {r['experts']:,}" if r["experts"] else ""
        print(f"  {name}: total {r['total']:,}, PLE table {r['ple_table']:,}, "
              f"main embedding {r['embedding'] - r['ple_table']:,}{extra}")

    if args.hf:
        print()
        print("transformers 5.23.0, full model from the same fixture (meta device, no allocation):")
        for name, _, path, r in rows:
            parts = hf_breakdown(path)
            text = parts.get("language_model", 0)
            towers = {k: v for k, v in parts.items() if k != "language_model"}
            print(f"  {name}: all {sum(parts.values()):,} = language_model {text:,} "
                  + "".join(f"+ {k} {v:,} " for k, v in towers.items())
                  + f"| ours - language_model = {r['total'] - text:,} (layer_scalar: a buffer in HF, "
                  f"{r['layers']} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
