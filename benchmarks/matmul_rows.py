"""What verifying K+1 tokens costs against decoding 1, on this machine: x[M, D] @ W[D, F] for M rows.

  python benchmarks/matmul_rows.py                          # the demo target's matmul shapes
  python benchmarks/matmul_rows.py --shapes 1536x6144 --rows 1,5,256

Speculative decoding pays when a verify pass over K+1 positions costs about what a 1-token decode
step costs: the weights are read once either way, and the extra rows are arithmetic that a
memory-bound step has to spare. Each shape's matmul runs `--layers` times with distinct weights inside
a jitted `fori_loop` (so the weights stream as in a decode step; nothing is hoisted), and the table
gives microseconds per matmul, the cost relative to 1 row, and the multiply-adds per second. On an
accelerator the K+1-row column stays near 1x; on a few CPU cores it does not, and that ratio bounds
the speedup: speedup <= tokens per verify step / (cost of K+1 rows relative to 1).
"""

from __future__ import annotations

import argparse
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="256x768,256x1536,768x256,256x4096",
                   help="comma-separated DxF weight shapes (default: the demo target's MLP, double-wide MLP, "
                        "down projection and tied LM head)")
    p.add_argument("--rows", default="1,2,3,4,5,8,64", help="comma-separated row counts M")
    p.add_argument("--layers", type=int, default=16, help="distinct weight matrices per loop iteration")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error("--shapes takes DxF pairs like 256x768, --rows integers")
    if any(len(s) != 2 for s in args.shapes):
        p.error("--shapes takes DxF pairs like 256x768")
    if min(min(s) for s in args.shapes) < 1 or min(args.rows) < 1 or args.layers < 1 or args.repeats < 1:
        p.error("shapes, rows, --layers and --repeats must be positive")
    args.rows = sorted(set(args.rows))
    return args


def time_matmul(rows: int, d: int, f: int, layers: int, repeats: int, dtype) -> float:
    """Seconds per [rows, d] @ [d, f] matmul, median over `repeats` calls of 10 x `layers` matmuls."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((d, f), np.float32) * 0.02, dtype) for _ in range(layers)]
    x = jnp.ones((rows, d), dtype)
    n = min(d, f)

    @jax.jit
    def run(x, ws):
        def body(_, x):
            for w in ws:  # each output feeds the next matmul: no matmul can be skipped or hoisted
                y = jnp.dot(x, w, preferred_element_type=jnp.float32)
                x = x.at[:, :n].add((y[:, :n] * 1e-3).astype(x.dtype))
            return x
        return jax.lax.fori_loop(0, 10, body, x)

    run(x, ws).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x, ws).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (10 * layers)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}, {jax.device_count()} device(s)), "
          f"{args.dtype}, {args.layers} weights per loop, median of {args.repeats}")
    print(f"{'weight':>10}  {'rows':>4}  {'us/matmul':>9}  {'vs 1 row':>8}  {'GMAC/s':>7}")
    for d, f in args.shapes:
        base = None
        for m in args.rows:
            t = time_matmul(m, d, f, args.layers, args.repeats, dtype)
            base = base or (t if m == 1 else None)
            rel = f"{t / base:.2f}x" if base else "-"
            print(f"{f'{d}x{f}':>10}  {m:>4}  {t * 1e6:9.1f}  {rel:>8}  {m * d * f / t / 1e9:7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
