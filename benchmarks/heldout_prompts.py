"""Writes held-out prompts for the demo pair: token-id lists (one JSON list per line) cut from
standard-library files the demo never trained on (the manifest's `heldout` split).

    python benchmarks/heldout_prompts.py --model gemma4_jax/demo/target --out /tmp/heldout.jsonl

See gemma4_jax.corpus.heldout_prompts for how prompts are cut. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gemma4_jax import corpus
from gemma4_jax.tokenizer import load_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "gemma4_jax", "demo", "target"))
    p.add_argument("--manifest", default=None, help="default: corpus_manifest.json next to the model")
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    manifest = args.manifest or os.path.join(os.path.dirname(os.path.abspath(args.model)), "corpus_manifest.json")
    prompts = corpus.heldout_prompts(load_tokenizer(args.model), manifest, args.count, args.tokens)
    with open(args.out, "w") as f:
        for ids in prompts:
            f.write(json.dumps(ids) + "\n")
    print(f"{len(prompts)} held-out prompts -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
