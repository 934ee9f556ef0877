"""Builds the demo pair shipped in gemma4_jax/demo: a small Gemma-4-architecture target trained on
the Python standard library's source, and an MTP drafter distilled against it.

    python -m gemma4_jax.demo_build --out gemma4_jax/demo

Every step is seeded; the corpus is the manifest's train split (sha256-verified), so the same
CPython version regenerates the same data. Writes DIR/target and DIR/drafter as Hugging Face
checkpoints (bf16) with the tokenizer, DIR/corpus_manifest.json, and DIR/README.md with the
command, corpus, steps, losses and times. The set is written atomically: it is built next to DIR
and swapped in whole at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from gemma4_jax import corpus, export, train
from gemma4_jax.config import FULL, SLIDING, Config, Rope

EOS_IDS = [1, 106]  # <eos>, <turn|>
SHIPPED_MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "corpus_manifest.json")


def target_config(vocab_size: int) -> Config:
    """E2B's features at demo scale: 5:1 sliding/full layers (proportional RoPE on full ones), PLE,
    KV sharing over the last third with a double-wide MLP there, one KV head."""
    L = 8
    types = tuple(FULL if (i + 1) % 4 == 0 else SLIDING for i in range(L))
    return Config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=1,
        head_dim=64, global_head_dim=128, num_global_kv_heads=1, layer_types=types, sliding_window=128,
        rope_sliding=Rope(10000.0), rope_full=Rope(1e6, fraction=0.25), final_logit_softcapping=30.0,
        num_kv_shared_layers=3, double_wide_mlp=True, ple_dim=16, ple_vocab_size=vocab_size,
        max_position_embeddings=4096,
    ).validate("demo target")


def _log(name):
    def on_step(step, loss, metrics, seconds):
        extra = ""
        if metrics and "agree" in metrics:
            extra = " agree " + " ".join(f"{a:.2f}" for a in np.asarray(metrics["agree"]))
        print(f"[{name}] step {step} loss {loss:.4f}{extra} ({seconds:.0f}s)", file=sys.stderr, flush=True)
        on_step.last = (step, loss, seconds)
    on_step.last = None
    return on_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma4_jax.demo_build")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target-steps", type=int, default=1000)
    p.add_argument("--target-lr", type=float, default=3e-3)
    p.add_argument("--drafter-steps", type=int, default=400)
    p.add_argument("--drafter-lr", type=float, default=3e-3)
    p.add_argument("--drafter-hidden", type=int, default=128)
    p.add_argument("--drafter-layers", type=int, default=1,
                   help="decoder layers of the drafter (1: one full-attention layer, 1/8 of the target's depth)")
    p.add_argument("--init-target", metavar="DIR",
                   help="continue training from this target checkpoint (e.g. a previous build's DIR/target); "
                        "with --target-steps 0 it is used as is")
    p.add_argument("--init-drafter", metavar="DIR",
                   help="continue distilling from this drafter checkpoint (its shape must match the --drafter-* options)")
    p.add_argument("--distill-temperatures", default="0,0.7",
                   help="the target continues corpus prefixes at each of these temperatures (0: greedy), "
                        "an equal share of the distillation sequences each")
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--distill-sequences", type=int, default=256)
    p.add_argument("--loss", choices=train.LOSSES, default="ce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--manifest", default=SHIPPED_MANIFEST,
                   help="corpus manifest whose train files (sha256-checked) are the training data "
                        "(default: the shipped gemma4_jax/demo/corpus_manifest.json)")
    p.add_argument("--new-manifest", action="store_true",
                   help="use this interpreter's standard library as it is, with a new manifest, instead of "
                        "--manifest (another CPython version: the data then differs from the shipped pair's)")
    args = p.parse_args(argv)
    if not args.target_steps and not args.init_target:
        p.error("--target-steps 0 needs --init-target")
    for name, lo in (("target_steps", 0), ("drafter_steps", 1), ("batch_size", 2), ("seq_len", 2), ("seed", 0),
                     ("drafter_hidden", 1), ("drafter_layers", 1), ("draft_len", 1), ("distill_sequences", 1),
                     ("vocab_size", 256)):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}")
    try:
        args.temperatures = [float(t) for t in args.distill_temperatures.split(",")]
    except ValueError:
        p.error("--distill-temperatures takes comma-separated numbers")
    from gemma4_jax.sampling import MIN_TEMPERATURE

    if not args.temperatures or any(t < 0 or 0 < t < MIN_TEMPERATURE for t in args.temperatures):
        p.error(f"--distill-temperatures must be 0 (greedy) or >= {MIN_TEMPERATURE}")
    try:
        export.check_destination(args.out, True, _is_demo_build)
    except FileExistsError:
        p.error(f"--out {args.out}: exists and is not a demo build (no corpus_manifest.json); choose another")
    try:
        manifest = corpus.build_manifest() if args.new_manifest else corpus._load(args.manifest)
        corpus.read_corpus(manifest, "train")  # every train file is checked against its sha256 now
    except (OSError, ValueError, corpus.CorpusMismatchError) as e:
        p.error(f"--manifest {args.manifest}: {e}")
    command = "python -m gemma4_jax.demo_build " + " ".join(argv if argv is not None else sys.argv[1:])
    # The whole set (manifest, target, drafter, README) is built in a staging directory next to
    # --out and swapped in at the end: an interrupted build leaves the previous set as it was.
    export.atomic_directory(args.out, lambda stage: _build(args, manifest, command, stage), overwrite=True,
                            replaceable=_is_demo_build)
    return 0


def _is_demo_build(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "corpus_manifest.json"))


def _build(args, manifest: dict, command: str, out: str) -> None:
    t0 = time.time()
    with open(os.path.join(out, "corpus_manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    with tempfile.TemporaryDirectory(prefix="gemma4_demo_") as work:
        _build_pair(args, manifest, command, out, work, t0)


def _build_pair(args, manifest, command, out, work, t0) -> None:
    tok_path = corpus.train_tokenizer(manifest, os.path.join(work, "tokenizer"), args.vocab_size)
    from gemma4_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    ids = np.concatenate([np.asarray(tok.encode(text, add_bos=True), np.int32)
                          for _, text in corpus.read_corpus(manifest, "train")])
    print(f"corpus: {len(manifest['files'])} files, {len(ids)} training tokens", file=sys.stderr)
    tok_dir = os.path.dirname(tok_path)

    import gemma4_jax

    cfg = target_config(tok.vocab_size)
    init = _init_params(args.init_target, cfg, "--init-target", "the demo target's")
    log_t = _log("target")
    t1 = time.time()
    if args.target_steps:
        tparams = train.pretrain(cfg, train.window_batches(ids, args.seq_len + 1, args.batch_size, args.seed),
                                 steps=args.target_steps, lr=args.target_lr, seed=args.seed, params=init,
                                 on_step=log_t, log_every=50)
    else:
        tparams = init
    target_seconds = time.time() - t1
    gen = {"bos_token_id": 2, "eos_token_id": EOS_IDS, "pad_token_id": 0}
    tdir = export.export_target(os.path.join(out, "target"), cfg, _bf16(tparams), generation_config=gen,
                                extra_files=export.tokenizer_files(tok_dir), overwrite=True)

    # The drafter learns from the target's own continuations of corpus prefixes (greedy and sampled).
    target = gemma4_jax.load(tdir, dtype="float32")
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(ids) - 64, args.distill_sequences)
    prompts = [ids[s: s + 32].tolist() for s in starts]
    temps = args.temperatures
    t2 = time.time()
    seqs = np.concatenate([train.sample_sequences(target, prompts[i: i + 64], args.seq_len + 1,
                                                  temperature=temps[(i // 64) % len(temps)], seed=args.seed + i)
                           for i in range(0, len(prompts), 64)])
    corpus_windows = train.window_batches(ids, args.seq_len + 1, args.batch_size // 2, args.seed + 1)

    def mixed():
        r = np.random.default_rng(args.seed + 2)
        while True:
            yield np.concatenate([seqs[r.integers(0, len(seqs), args.batch_size // 2)], next(corpus_windows)])

    dcfg = train.drafter_config_for(cfg, hidden_size=args.drafter_hidden, num_layers=args.drafter_layers,
                                    intermediate_size=4 * args.drafter_hidden)
    dinit = _init_params(args.init_drafter, dcfg, "--init-drafter", "the --drafter-* options'")
    log_d = _log("drafter")
    dparams = train.distill(target.params, cfg, dcfg, mixed(), steps=args.drafter_steps, lr=args.drafter_lr,
                            seed=args.seed, draft_len=args.draft_len, loss=args.loss, dparams=dinit,
                            on_step=log_d, log_every=25)
    drafter_seconds = time.time() - t2
    export.export_drafter(os.path.join(out, "drafter"), dcfg, _bf16(dparams), generation_config=gen,
                          num_assistant_tokens=args.draft_len, extra_files=export.tokenizer_files(tok_dir),
                          overwrite=True)
    _write_readme(out, args, command, manifest, len(ids), log_t.last, log_d.last, target_seconds, drafter_seconds,
                  time.time() - t0)


def _init_params(path, cfg, flag: str, expected: str):
    """Float32 parameters of the checkpoint at `path` (None: none), whose config must be `cfg`."""
    if not path:
        return None
    import gemma4_jax

    start = gemma4_jax.load(path, dtype="float32")
    if start.config != cfg:
        raise SystemExit(f"{flag} {path}: its config differs from {expected}")
    return start.params


def _bf16(params):
    return train._cast(params, "bfloat16")


def _write_readme(out, args, command, manifest, n_tokens, t_last, d_last, t_sec, d_sec, total):
    import platform

    start = f"continued from `{args.init_target}`" if args.init_target else f"from random init (seed {args.seed})"
    target_line = f"- target: {start}"
    if args.target_steps:
        target_line += (f", {args.target_steps} AdamW steps, batch {args.batch_size} x {args.seq_len} tokens, "
                        f"lr {args.target_lr}, data seed {args.seed};\n  final training loss {t_last[1]:.3f} "
                        f"(step {t_last[0]}); {t_sec / 60:.1f} min.")
    else:
        target_line += ", not trained further."

    dstart = f", continued from `{args.init_drafter}`" if args.init_drafter else ""
    text = f"""# The demo pair

A small Gemma-4-architecture target (`target/`, Gemma4ForCausalLM layout) and an MTP drafter
(`drafter/`, Gemma4AssistantForCausalLM layout) trained from scratch on the Python standard
library's source. Both load with `gemma4_jax.load` and with transformers 5.23.0
(the drafter after transformers' all-reuse `kv_sharing_modes` fix, see tests/hf_models.py).

Regenerate (same CPython version: every train file is checked against the sha256 in `corpus_manifest.json`):

    {command}

- corpus: {len(manifest['files'])} stdlib files of CPython {manifest.get('python_version', platform.python_version())}
  (train split, {n_tokens} tokens with the sentencepiece tokenizer trained on it, vocab {args.vocab_size});
  held-out files are marked `heldout` in the manifest.
{target_line}
- drafter: {args.drafter_layers} decoder layer(s) of width {args.drafter_hidden}{dstart}; {args.drafter_steps} steps of
  distillation ({args.loss}), {args.draft_len} unrolled draft steps, on the target's own continuations of corpus
  prefixes (temperatures {args.distill_temperatures}) mixed with corpus windows; final loss {d_last[1]:.3f};
  {d_sec / 60:.1f} min (including sampling the continuations).
- total {total / 60:.1f} min on {os.cpu_count()} CPU cores; weights stored in bfloat16.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
