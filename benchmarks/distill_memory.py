"""Memory of one drafter-distillation step at Gemma 4's real vocabulary, with and without chunking.

  python benchmarks/distill_memory.py [--batch-size 16] [--seq-len 256] [--draft-len 4]

`train.distill_loss` computes the vocabulary-sized logits (the target's and the drafter's)
a few positions at a time and recomputes them in the backward pass. This script compiles the
gradient of the loss for a target with Gemma 4's vocabulary (262144) and E2B's width (1536), but
only two layers (the logits, not the layers, are what grows with the vocabulary), and a 4-layer
width-256 drafter as E2B's, without allocating anything (abstract inputs), and prints XLA's
memory analysis for the whole sequence in one chunk and for the default chunk.
"""

from __future__ import annotations

import argparse
import functools


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=262144)
    args = p.parse_args(argv)
    if min(args.batch_size, args.seq_len, args.draft_len, args.vocab_size) < 1:
        p.error("all sizes must be positive")

    import jax
    import jax.numpy as jnp

    from gemma4_jax import drafter as drafter_lib, params as params_lib, train
    from gemma4_jax.config import FULL, SLIDING, Config, Rope

    tcfg = Config(vocab_size=args.vocab_size, hidden_size=1536, intermediate_size=6144, num_heads=8, num_kv_heads=1,
                  head_dim=256, global_head_dim=512, num_global_kv_heads=1, layer_types=(SLIDING, FULL),
                  sliding_window=512, rope_sliding=Rope(10000.0), rope_full=Rope(1e6, fraction=0.25),
                  final_logit_softcapping=30.0, max_position_embeddings=131072).validate("bench target")
    dcfg = train.drafter_config_for(tcfg, hidden_size=256, num_layers=4)
    abstract = lambda decl: jax.tree.map(  # noqa: E731
        lambda q: jax.ShapeDtypeStruct(q.shape, jnp.dtype(q.dtype or jnp.float32)), decl, is_leaf=params_lib.is_param)
    tparams = abstract(params_lib.declare(tcfg))
    dparams = abstract(drafter_lib.declare(dcfg))
    tokens = jax.ShapeDtypeStruct((args.batch_size, args.seq_len), jnp.int32)
    B, T, V = args.batch_size, args.seq_len, args.vocab_size
    print(f"target vocab {V}, width 1536, 2 layers; drafter 4 x 256; batch {B} x {T}, K={args.draft_len}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"one [B, T, V] float32 block: {B * T * V * 4 / 2**30:.2f} GiB")
    for name, chunk in (("whole sequence", T), ("default chunk", None)):
        loss = functools.partial(train.distill_loss, dcfg=dcfg, tcfg=tcfg, draft_len=args.draft_len, chunk=chunk)
        grad = jax.jit(jax.grad(lambda d, t, x: loss(d, tparams=t, tokens=x)[0]))
        mem = grad.lower(dparams, tparams, tokens).compile().memory_analysis()
        used = chunk or max(1, train.LOGITS_BUDGET // (B * V))
        print(f"{name:>15} ({used} positions per chunk): temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB, "
              f"arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
