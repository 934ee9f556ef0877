"""Prints the sharding table of a real-size Gemma 4 config on a (data, model) mesh, with per-device
bf16 bytes. Shapes only (jax.eval_shape): nothing is allocated, so it runs on any laptop.

  python benchmarks/sharding_table.py tests/fixtures/configs/gemma-4-31B-it.json --mesh 1x8
  python benchmarks/sharding_table.py gemma-4-E2B-it --mesh 2x4 --full

A bare name is looked up in tests/fixtures/configs/. Layers with the same layout are folded into one
row (`layers[full]`, `layers[*]`, `layers[0-14]`) unless --full. Fake CPU devices are created when the
machine has fewer devices than the mesh needs (only the mesh's shape matters here).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../tests/fixtures/configs"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a config.json (or its directory), or a name in tests/fixtures/configs "
                                   "(e.g. gemma-4-31B-it)")
    ap.add_argument("--mesh", default="1x8", help="DATAxMODEL, e.g. 1x8, 2x4 (default 1x8)")
    ap.add_argument("--full", action="store_true", help="one row per parameter, no folding of layers")
    args = ap.parse_args(argv)
    m = re.fullmatch(r"(\d+)x(\d+)", args.mesh)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        ap.error(f"--mesh must look like 2x4, got {args.mesh!r}")
    args.data, args.model = int(m[1]), int(m[2])
    path = args.config
    if not os.path.exists(path):
        named = os.path.join(FIXTURES, path if path.endswith(".json") else path + ".json")
        if not os.path.exists(named):
            have = sorted(f[:-5] for f in os.listdir(FIXTURES) if f.endswith(".json")) if os.path.isdir(FIXTURES) \
                else []
            ap.error(f"{path}: no such file, nor a fixture name (have: {', '.join(have) or 'none'})")
        path = named
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    args.config = path
    return args


def fake_devices(n: int) -> None:
    """Before jax is imported: let the CPU backend expose `n` devices (GPUs/TPUs are unaffected)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def fold(rows, kinds: tuple[str, ...]):
    """Merges rows that differ only in their layer index into (path, count, ...); the layer set is
    named by kind (`layers[sliding]`), `*` for all, or spelt as ranges."""
    named = {tuple(range(len(kinds))): "*"}
    for kind in sorted(set(kinds)):
        named.setdefault(tuple(i for i, k in enumerate(kinds) if k == kind), kind)
    groups: dict[tuple, list[int]] = {}
    for path, *rest in rows:
        m = re.match(r"\['layers'\]\[(\d+)\](.*)", path)
        key = ("['layers'][#]" + m[2], *rest) if m else (path, *rest)
        groups.setdefault(key, []).append(int(m[1]) if m else -1)
    out = []
    for (path, *rest), idx in groups.items():
        if idx[0] >= 0:
            path = path.replace("[#]", f"[{named.get(tuple(idx)) or ranges(idx)}]")
        out.append((path, len(idx), *rest))
    return out


def ranges(idx: list[int]) -> str:
    """[0, 1, 2, 4, 7, 8] -> '0-2,4,7-8'."""
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(runs)


def print_table(head, rows, right=frozenset()):
    """A Markdown table, padded to line up in a terminal too."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for r in rows:
        print(line(r))


def main(argv=None) -> int:
    args = parse_args(argv)
    need = args.data * args.model
    fake_devices(need)

    import jax
    import jax.numpy as jnp

    from gemma4_jax import config as config_lib, params as params_lib, sharding

    devices = jax.devices()
    if len(devices) < need:
        devices = jax.devices("cpu")
    if len(devices) < need:
        sys.exit(f"mesh {args.mesh} needs {need} devices; this process has {len(devices)} "
                 "(XLA_FLAGS already sets --xla_force_host_platform_device_count lower?)")
    mesh = sharding.make_mesh(args.data, args.model, devices=devices[:need])

    try:
        cfg = config_lib.load_config(args.config)
    except config_lib.ConfigError as e:
        sys.exit(f"not a target text-model config: {e}")
    decl = params_lib.declare(cfg)
    item = jnp.dtype(jnp.bfloat16).itemsize

    # The abstract parameters, placed by the rules: eval_shape allocates nothing.
    shardings = sharding.param_shardings(decl, mesh)
    abstract = jax.eval_shape(
        jax.jit(lambda k: params_lib.init(decl, k, jnp.bfloat16), out_shardings=shardings), jax.random.key(0))

    flat_decl = jax.tree_util.tree_flatten_with_path(decl, is_leaf=params_lib.is_param)[0]
    rows, total, per_device, replicated_on_purpose = [], 0, 0, 0
    for (_, p), (where, shape, ps), a in zip(flat_decl, sharding.describe(decl, mesh), jax.tree.leaves(abstract)):
        ps = tuple(ps) + (None,) * (len(shape) - len(ps))
        local = sharding.shard_bytes(p, mesh, item)
        # Cross-check the rules' arithmetic against the sharding XLA itself would use.
        assert item * math.prod(a.sharding.shard_shape(a.shape)) == local, where
        dropped = [f"{ax}:{n}" for n, ax, got in zip(shape, p.axes, ps)
                   if ax is not None and sharding.RULES.get(ax) is not None and got is None]
        total += item * math.prod(shape)
        per_device += local
        if dropped:
            replicated_on_purpose += local
        axes = "(" + ", ".join(ax or "-" for ax in p.axes) + ")"
        spec = "(" + ", ".join(ax or "-" for ax in ps) + ")"
        rows.append((where, shape, axes, spec, " ".join(dropped), local))

    rows = fold(rows, cfg.layer_types) if not args.full else [(r[0], 1, *r[1:]) for r in rows]
    print(f"# {os.path.basename(args.config)} on a {args.data}x{args.model} (data x model) mesh, bf16; rules: "
          + ", ".join(f"{k}->{v or '-'}" for k, v in sharding.RULES.items()))
    print()
    print_table(("parameter", "n", "shape", "logical axes", "mesh axes", "replicated: does not divide",
                 "per device", "x n"),
                [(path, str(n), "x".join(map(str, shape)), axes, spec, dropped, fmt_bytes(b), fmt_bytes(b * n))
                 for path, n, shape, axes, spec, dropped, b in rows],
                right={1, 6, 7})
    print()
    print(f"parameters: {params_lib.count(decl):,} ({fmt_bytes(total)} in bf16)")
    print(f"per device: {fmt_bytes(per_device)} in bf16 ({per_device / total:.1%} of the model; "
          f"1/model = {1 / args.model:.1%}: parameters are replicated over `data`)")
    print(f"  of which replicated because a dimension does not divide: {fmt_bytes(replicated_on_purpose)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
