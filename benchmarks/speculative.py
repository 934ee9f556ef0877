"""Speculative (MTP-drafted) decoding against plain decoding: speed, acceptance, losslessness.

  python benchmarks/speculative.py --make-tiny /tmp/bench      # tiny random target + drafter (no weights needed)
  python benchmarks/speculative.py --target /tmp/bench/target --drafter /tmp/bench/drafter \
      --batch-sizes 1,4 --max-new-tokens 48 --hf [--json out.json]

Per batch size B, in one process, every prompt runs, in batches of B (the last batch filled up from
the first prompts): the first call of plain and of speculative greedy `generate` (it compiles), then
`--repeats` rounds that time one plain and one speculative call each, interleaved so that a slow
spell of the machine hits both alike; each mode's median per batch is its steady state, and times
add up over batches. Tokens/s are new tokens over the wall time of a whole `generate` call (prefill included). The stop token is ignored
so that every row produces exactly `--max-new-tokens` tokens: rows of equal length make the two
modes comparable (and random models emit <eos> early). Speculative greedy output must equal plain
greedy output token for token; the script prints whether it does.

With `--hf` (batch size 1 only) the same prompt also goes through transformers' greedy `generate`,
plain and assisted with the drafter loaded as Gemma4AssistantForCausalLM, patched the way
transformers 5.23.0 needs (see `patch_transformers`).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

S, F = "sliding_attention", "full_attention"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="target checkpoint directory (HF format)")
    p.add_argument("--drafter", help="assistant (MTP drafter) checkpoint directory (HF format)")
    p.add_argument("--prompts", help="file with one JSON list of token ids per line; absent or 'none': random "
                                     "token ids of varied lengths (seeded)")
    p.add_argument("--batch-sizes", default="1,4", help="comma-separated; at batch B the prompts run B at a time")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="K drafts per verify step (default: what generate() would choose)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on an accelerator, float32 on CPU (where bf16 matmuls are slow)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call; median reported")
    p.add_argument("--prompt-len", default="16,96", help="MIN,MAX length of random prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--hf", action="store_true", help="also time transformers (plain and assisted), batch size 1")
    p.add_argument("--json", help="write all measurements to this file")
    p.add_argument("--make-tiny", metavar="DIR", help="save a tiny random target and drafter to DIR/target and "
                                                      "DIR/drafter, then exit")
    args = p.parse_args(argv)
    if args.make_tiny:
        return args
    if not (args.target and args.drafter):
        p.error("--target and --drafter are required (or --make-tiny DIR)")
    try:
        args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
        lo, hi = (int(x) for x in args.prompt_len.split(","))
    except ValueError:
        p.error("--batch-sizes and --prompt-len take comma-separated integers")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be positive")
    if not 1 <= lo <= hi:
        p.error("--prompt-len MIN,MAX needs 1 <= MIN <= MAX")
    if min(args.repeats, args.max_new_tokens, 1 if args.num_draft_tokens is None else args.num_draft_tokens) < 1:
        p.error("--repeats, --max-new-tokens and --num-draft-tokens must be positive")
    args.prompt_len = (lo, hi)
    return args


# ---------------------------------------------------------------------------------------------------
# Tiny random models (the "e2b" pair of tests/hf_models.py, copied: benchmarks do not import tests).

TINY_TARGET = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
    global_head_dim=32, sliding_window=8, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
    initializer_range=0.05, num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=1,
    num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size_per_layer_input=512,
    use_double_wide_mlp=True,
)
TINY_DRAFTER = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    head_dim=16, global_head_dim=32, sliding_window=8, layer_types=[S, S, S, F], rms_norm_eps=1e-6,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4,
    initializer_range=0.05, num_key_value_heads=1,
)


def make_tiny(out_dir: str, seed: int = 0) -> None:
    import torch
    from transformers import (Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4ForCausalLM,
                              Gemma4TextConfig)

    @torch.no_grad()
    def randomize(model):
        # HF initialises these to one, which would make the tiny model unrepresentative.
        g = torch.Generator().manual_seed(seed)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "layernorm.weight", "layer_scalar", "router.scale",
                              "per_expert_scale")) or "layernorm_" in name:
                t.copy_(t.new_empty(t.shape).uniform_(0.5, 1.5, generator=g))

    patch_transformers()
    torch.manual_seed(seed)
    target = Gemma4ForCausalLM(Gemma4TextConfig(**TINY_TARGET)).eval()
    randomize(target)
    cfg = Gemma4AssistantConfig(text_config=Gemma4TextConfig(**TINY_DRAFTER).to_dict(),
                                backbone_hidden_size=TINY_TARGET["hidden_size"], use_ordered_embeddings=True,
                                num_centroids=16, centroid_intermediate_top_k=4)
    drafter = Gemma4AssistantForCausalLM(cfg).eval()
    randomize(drafter)
    g = torch.Generator().manual_seed(seed)
    drafter.masked_embedding.token_ordering.copy_(torch.randperm(TINY_DRAFTER["vocab_size"], generator=g))
    drafter.generation_config.num_assistant_tokens = 4
    target.save_pretrained(os.path.join(out_dir, "target"))
    drafter.save_pretrained(os.path.join(out_dir, "drafter"))
    print(f"saved a tiny random target and drafter; now run:\n  python {sys.argv[0]} "
          f"--target {out_dir}/target --drafter {out_dir}/drafter")


# ---------------------------------------------------------------------------------------------------
# transformers 5.23.0 needs three fixes before assisted decoding with a Gemma 4 drafter runs
# (spec §4.1, §5.1, §6): kv_sharing_modes raises for an all-shared drafter; a target without KV
# sharing exposes no K/V to the drafter; num_assistant_tokens is read from the assistant only
# (set where the assistant is loaded).

def patch_transformers() -> None:
    import transformers

    classes = [transformers.Gemma4TextConfig]
    if hasattr(transformers, "Gemma4UnifiedTextConfig"):
        classes.append(transformers.Gemma4UnifiedTextConfig)
    for cls in classes:
        original = cls.kv_sharing_modes.fget
        if getattr(original, "patched", False):
            continue

        def kv_sharing_modes(self, original=original):
            L, shared = self.num_hidden_layers, self.num_kv_shared_layers
            if shared == L:  # the drafter: every layer reads the target's K/V
                return ["reuse"] * L
            if shared == 0:  # 26B-A4B / 31B: the last sliding and last full layers feed the drafter
                modes = [None] * L
                for kind in set(self.layer_types):
                    modes[max(i for i, t in enumerate(self.layer_types) if t == kind)] = "store"
                return modes
            return original(self)

        kv_sharing_modes.patched = True
        cls.kv_sharing_modes = property(kv_sharing_modes)


# ---------------------------------------------------------------------------------------------------

def read_prompts(path, vocab: int, count: int, seed: int, lengths: tuple[int, int], bos) -> list[list[int]]:
    if path and path.lower() != "none":
        prompts = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                ids = json.loads(line)
                if not (isinstance(ids, list) and ids and all(isinstance(t, int) and 0 <= t < vocab for t in ids)):
                    sys.exit(f"{path}:{n}: expected a non-empty JSON list of token ids in [0, {vocab})")
                prompts.append(ids)
        if not prompts:
            sys.exit(f"{path}: no prompts")
        return prompts
    rng = np.random.default_rng(seed)
    prompts = []
    for n in rng.integers(lengths[0], lengths[1] + 1, count):
        ids = rng.integers(0, vocab, int(n)).tolist()
        if isinstance(bos, int):
            ids[0] = bos
        prompts.append(ids)
    return prompts


def measure(call, repeats: int):
    """One warm-up call (compiles), then `repeats` timed calls. Returns (timings, last result)."""
    timings, results = measure_interleaved({"call": call}, repeats)
    return timings["call"], results["call"]


def measure_interleaved(calls: dict, repeats: int):
    """A warm-up call of each (compiles), then `repeats` rounds that time each call once, in turn, so
    that a slow spell of the machine hits every call alike. Returns ({name: timings}, {name: last result})."""
    first, results, times = {}, {}, {name: [] for name in calls}
    for name, call in calls.items():
        start = time.perf_counter()
        results[name] = call()
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()  # generate() returns host values: the time covers the whole computation
            times[name].append(time.perf_counter() - start)
    timings = {}
    for name in calls:
        median = statistics.median(times[name])
        timings[name] = {"first_call_s": first[name], "compile_s": max(first[name] - median, 0.0),
                         "median_s": median, "times_s": times[name]}
    return timings, results


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    out = {"equal": not bad and len(a) == len(b), "rows_differing": bad}
    if bad:
        x, y = a[bad[0]], b[bad[0]]
        out["first_difference"] = {"row": bad[0], "index": next((j for j, (p, q) in enumerate(zip(x, y)) if p != q),
                                                                min(len(x), len(y)))}
    return out


def groups_of(prompts, b: int) -> list[list[list[int]]]:
    """Every prompt in batches of b; the last batch is filled up from the start (cycled)."""
    n = -(-len(prompts) // b)
    return [[prompts[(g * b + i) % len(prompts)] for i in range(b)] for g in range(n)]


def bench_ours(model, drafter, batches, args, K):
    """Plain and speculative greedy generate over each batch of prompts, their timed calls interleaved;
    times are the sum of each batch's median, telemetry the sum over batches. The first batch's
    warm-up calls compile."""
    from gemma4_jax.generate import generate

    def run(d, prompts):
        return generate(model, prompts, drafter=d, max_new_tokens=args.max_new_tokens,
                        num_draft_tokens=K if d is not None else None, stop_tokens=[])

    modes = {"plain": None, "speculative": drafter}
    totals = {name: {"median_s": 0.0, "new_tokens": 0, "verify_steps": 0, "accepted_drafts": 0, "proposed_drafts": 0,
                     "accept_histogram": np.zeros(K + 1, np.int64)} for name in modes}
    tokens = {name: [] for name in modes}
    for i, batch in enumerate(batches):
        timings, results = measure_interleaved(
            {name: functools.partial(run, d, batch) for name, d in modes.items()}, args.repeats)
        for name, d in modes.items():
            t, res, total = timings[name], results[name], totals[name]
            if i == 0:
                total.update(first_call_s=t["first_call_s"], compile_s=t["compile_s"])
            total["median_s"] += t["median_s"]
            total["new_tokens"] += sum(map(len, res.tokens))
            if d is not None:
                for k in ("verify_steps", "accepted_drafts", "proposed_drafts"):
                    total[k] += res.stats[k]
                total["accept_histogram"] += np.asarray(res.stats["accept_histogram"])
            tokens[name] += res.tokens
    out = {}
    for name, d in modes.items():
        total = totals[name]
        total["tokens_per_s"] = total["new_tokens"] / total["median_s"]
        if d is None:
            for k in ("verify_steps", "accepted_drafts", "proposed_drafts", "accept_histogram"):
                total.pop(k)
        else:
            steps = total["verify_steps"]
            total["accept_histogram"] = total["accept_histogram"].tolist()
            total["mean_tokens_per_step"] = (total["new_tokens"] - sum(map(len, batches))) / steps if steps else 0.0
            total["draft_acceptance"] = (total["accepted_drafts"] / total["proposed_drafts"]
                                         if total["proposed_drafts"] else 0.0)
        out[name] = (total, tokens[name])
    (plain_t, plain), (spec_t, spec) = out["plain"], out["speculative"]
    lens = [len(p) for batch in batches for p in batch]
    lossless = compare(spec, plain)
    if not lossless["equal"]:
        lossless["divergences"] = divergences(model, [p for batch in batches for p in batch], plain, spec,
                                              lossless["rows_differing"][:5])
    return {"batch_size": len(batches[0]), "batches": len(batches), "prompt_lengths": lens, "plain": plain_t,
            "speculative": spec_t, "speedup": spec_t["tokens_per_s"] / plain_t["tokens_per_s"],
            "lossless": lossless}, plain


def divergences(model, prompts, plain, spec, rows) -> list[dict]:
    """Where speculative and plain greedy part: the target's logits (one prefill over prompt + the common
    prefix) of the two tokens chosen there. A gap near the dtype's rounding error is a near-tie that the
    K+1-token verify pass and the 1-token plain step round differently (bf16 does this); a large gap is a bug."""
    out = []
    for i in rows:
        j = next((k for k, (a, b) in enumerate(zip(plain[i], spec[i])) if a != b), None)
        if j is None:
            continue
        logits = np.asarray(model.logits([list(prompts[i]) + list(plain[i][:j])]), np.float32)[0, -1]
        a, b = int(plain[i][j]), int(spec[i][j])
        out.append({"row": i, "index": j, "plain_token": a, "spec_token": b, "plain_logit": float(logits[a]),
                    "spec_logit": float(logits[b]), "top_logit": float(logits.max())})
    return out


def bench_hf(args, prompt, K, ours_plain):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    patch_transformers()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(device).eval()
    assistant = AutoModelForCausalLM.from_pretrained(args.drafter, dtype=dtype).to(device).eval()
    assistant.generation_config.num_assistant_tokens = K
    for m in (target, assistant):  # same rule as ours: exactly max_new_tokens, no early stop
        m.generation_config.eos_token_id = None
    ids = torch.tensor([prompt], device=device)

    def run(**kw):
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                              do_sample=False, **kw)
        return [out[0, len(prompt):].tolist()]  # .tolist() waits for the device

    with torch.inference_mode():
        plain_t, plain = measure(run, args.repeats)
        assisted_t, assisted = measure(lambda: run(assistant_model=assistant), args.repeats)
    for t, toks in ((plain_t, plain), (assisted_t, assisted)):
        t.pop("compile_s")  # eager torch: the first call is just a warm-up
        t.update(new_tokens=len(toks[0]), tokens_per_s=len(toks[0]) / t["median_s"])
    return {"transformers": transformers.__version__, "torch": torch.__version__, "device": device,
            "class": type(target).__name__, "assistant_class": type(assistant).__name__,
            "prompt_length": len(prompt), "plain": plain_t, "assisted": assisted_t,
            "speedup": assisted_t["tokens_per_s"] / plain_t["tokens_per_s"],
            "assisted_equals_plain": compare(assisted, plain),
            "ours_plain_equals_hf_plain": compare(ours_plain, plain)}


def yes(c: dict) -> str:
    if c["equal"]:
        return "yes"
    d = c["first_difference"]
    gaps = [abs(v["plain_logit"] - v["spec_logit"]) for v in c.get("divergences", [])]
    gap = f"; target logit gap there <= {max(gaps):.4f}" if gaps else ""
    return f"NO (rows {c['rows_differing']} differ; first at row {d['row']} token {d['index']}{gap})"


def report(meta, results, hf) -> str:
    lines = [
        f"target  {meta['target']}  ({meta['target_desc']})",
        f"drafter {meta['drafter']}  ({meta['drafter_desc']})",
        f"dtype {meta['dtype']}, K={meta['num_draft_tokens']} drafts/step, max_new_tokens {meta['max_new_tokens']}, "
        f"stop token ignored; jax {meta['jax']} on {meta['backend']} ({meta['devices']}); "
        f"median of {meta['repeats']} calls after a warm-up",
        "",
    ]
    head = ("batch", "calls", "prompt lens", "compile s", "plain tok/s", "spec tok/s", "speedup", "tok/step",
            "draft acc", "accept hist (0..K)", "spec == plain")
    rows = []
    for r in results:
        p, s = r["plain"], r["speculative"]
        lens = r["prompt_lengths"]
        rows.append((str(r["batch_size"]), str(r["batches"]), f"{min(lens)}-{max(lens)}" if len(lens) > 1 else str(lens[0]),
                     f"{p['compile_s']:.1f} / {s['compile_s']:.1f}", f"{p['tokens_per_s']:.1f}",
                     f"{s['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", f"{s['mean_tokens_per_step']:.2f}",
                     f"{100 * s['draft_acceptance']:.1f}%", " ".join(map(str, s["accept_histogram"])),
                     yes(r["lossless"])))
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(w) if i < 9 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    lines += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    lines += ["", "calls: every prompt runs at every batch size, in this many batches (the last one filled up "
                  "from the first prompts); times are the sum of each batch's median;",
              "tok/s: new tokens of all rows per second of whole generate calls (prefill included); "
              "compile s: first call minus steady state (plain / spec);",
              "tok/step: new tokens per verify step; draft acc: accepted / proposed drafts; accept hist: verify "
              "steps with 0, 1, .., K drafts accepted (all rows).",
              "spec == plain: greedy outputs equal token for token; where a row differs, the target's logit gap "
              "between the two tokens at the first difference (a gap within rounding error is a near-tie that "
              "the (K+1)-token verify pass rounds differently from the 1-token plain step: expected in bfloat16)."]
    if hf is not None:
        p, a = hf["plain"], hf["assisted"]
        lines += [
            "",
            f"transformers {hf['transformers']} (torch {hf['torch']}, {hf['device']}, {hf['class']} + "
            f"{hf['assistant_class']}), batch 1, prompt length {hf['prompt_length']}:",
            f"  plain greedy     {p['tokens_per_s']:8.1f} tok/s   (first call {p['first_call_s']:.2f} s, "
            f"median {p['median_s']:.3f} s)",
            f"  assisted, K={meta['num_draft_tokens']}   {a['tokens_per_s']:8.1f} tok/s   (first call "
            f"{a['first_call_s']:.2f} s, median {a['median_s']:.3f} s)   speedup {hf['speedup']:.2f}x",
            f"  HF assisted == HF plain greedy: {yes(hf['assisted_equals_plain'])}",
            f"  ours plain greedy == HF plain greedy: {yes(hf['ours_plain_equals_hf_plain'])}",
        ]
    return "\n".join(lines)


def describe(cfg) -> str:
    c = getattr(cfg, "text", cfg)
    return f"hidden {c.hidden_size}, {c.num_layers} layers, vocab {c.vocab_size}"


def main(argv=None):
    args = parse_args(argv)
    if args.make_tiny:
        make_tiny(args.make_tiny)
        return
    if args.hf:  # leave accelerator memory to torch as well
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    import gemma4_jax
    from gemma4_jax.generate import DEFAULT_DRAFT_TOKENS

    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"

    model = gemma4_jax.load(args.target, dtype=args.dtype)
    drafter = gemma4_jax.load(args.drafter, dtype=args.dtype)
    if not isinstance(model, gemma4_jax.Model) or not isinstance(drafter, gemma4_jax.Drafter):
        sys.exit("--target must be a target checkpoint and --drafter an assistant checkpoint")
    # generate()'s own choice of K, resolved here so that the report and transformers use the same K.
    K = args.num_draft_tokens or DEFAULT_DRAFT_TOKENS.get(
        model.config.hidden_size, drafter.generation_config.get("num_assistant_tokens") or 4)
    prompts = read_prompts(args.prompts, model.config.vocab_size, max(args.batch_sizes), args.seed,
                           args.prompt_len, model.generation_config.get("bos_token_id"))

    meta = {"target": args.target, "drafter": args.drafter, "target_desc": describe(model.config),
            "drafter_desc": describe(drafter.config), "dtype": args.dtype, "num_draft_tokens": K,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "python": platform.python_version(), "prompts": args.prompts or f"random (seed {args.seed})"}
    results, ours_b1 = [], None
    for b in args.batch_sizes:
        batches = groups_of(prompts, b)
        print(f"batch {b}: timing plain and speculative generate on {len(batches)} batches ...", file=sys.stderr,
              flush=True)
        r, plain_tokens = bench_ours(model, drafter, batches, args, K)
        results.append(r)
        if b == 1:
            ours_b1 = plain_tokens[:1]

    hf = None
    if args.hf:
        if ours_b1 is None:
            print("--hf needs batch size 1 in --batch-sizes; skipped", file=sys.stderr)
        else:
            del model, drafter  # free our weights before transformers loads its copy
            gc.collect()
            print("batch 1: timing transformers ...", file=sys.stderr, flush=True)
            hf = bench_hf(args, prompts[0], K, ours_b1)

    print(report(meta, results, hf))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "transformers": hf}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
