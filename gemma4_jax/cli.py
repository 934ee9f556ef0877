"""`gemma4-jax` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEMO_DIR = os.path.join(os.path.dirname(__file__), "demo")
DEMO_TARGET, DEMO_DRAFTER = os.path.join(DEMO_DIR, "target"), os.path.join(DEMO_DIR, "drafter")


class UsageError(Exception):
    """A bad command line or input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


def number_arg(text: str, *, low: float, high: float = float("inf"), low_open: bool = False,
               integer: bool = False):
    """Parses a numeric flag value in [low, high] ((low, high] with low_open); NaN and inf refused."""
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
    ok = (value > low if low_open else value >= low) and value <= high and value not in (float("inf"),)
    if not ok:
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != float("inf") else \
            f"{'>' if low_open else '>='} {low:g}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def _positive_int(text):
    return number_arg(text, low=1, integer=True)


def _temperature(text):
    from gemma4_jax.sampling import MIN_TEMPERATURE

    value = number_arg(text, low=0)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {text!r}")
    return value


def _top_p(text):
    return number_arg(text, low=0, high=1, low_open=True)


def resolve(name: str | None, what: str) -> str:
    """A local checkpoint directory for `name`: a directory as is, else a Hugging Face model id
    fetched with huggingface_hub (honouring HF_TOKEN and the HF cache) when the network allows."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise UsageError(f"{what} {name!r} is a file; pass a checkpoint directory")
    if name.count("/") != 1:
        raise UsageError(f"{what} {name!r} is neither a directory nor a Hugging Face model id (owner/name)")
    hint = (f"download it on a machine with network access (`huggingface-cli download {name} "
            f"--local-dir DIR`), copy DIR here and pass --{what} DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{what} {name!r} is not a local directory and huggingface_hub is not installed; "
                         f"`pip install huggingface_hub` or {hint}") from None
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    except Exception as e:  # offline, gated, unknown id: one clear line
        raise UsageError(f"cannot fetch {what} {name!r} from the Hugging Face Hub ({type(e).__name__}); "
                         f"{hint}") from None


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {args.prompt_file!r}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    if args.prompt is None or args.prompt == "-":
        return sys.stdin.read() if not sys.stdin.isatty() else "def fibonacci(n):"
    return args.prompt


def _enable_compilation_cache():
    import jax

    cache_dir = os.environ.get("GEMMA4_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gemma4_jax", "xla"))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except OSError:
        pass  # a read-only home only costs compile time


def add_generate_args(p: argparse.ArgumentParser):
    p.add_argument("prompt", nargs="?", help="prompt text ('-' or absent with piped input: stdin)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--model", help="target checkpoint directory or Hugging Face id (default: the shipped demo)")
    p.add_argument("--drafter", help="drafter directory or id (default: the model's '-assistant' sibling)")
    p.add_argument("--no-draft", action="store_true", help="plain decoding, no drafter")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=_temperature, default=0.0)
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--top-p", type=_top_p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-draft-tokens", type=_positive_int)
    p.add_argument("--chat", action="store_true", help="format the prompt as a user turn")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32",
                   help="weights/activations dtype (default float32: fastest on CPU; use bfloat16 on TPU/GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, stats")


def run_generate(args) -> int:
    import gemma4_jax
    from gemma4_jax import tokenizer as tok_lib
    from gemma4_jax.generate import Stream, _stop_tokens

    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k / --top-p need --temperature > 0 (temperature 0 is greedy decoding)")
    prompt = _read_prompt(args)
    if args.model is None:
        model_dir, drafter_name = DEMO_TARGET, DEMO_DRAFTER
        if not os.path.isdir(model_dir):
            raise UsageError(f"no --model given and the demo model is not installed at {model_dir}")
    else:
        model_dir = resolve(args.model, "model")
        sibling = args.model.rstrip("/") + "-assistant"
        drafter_name = None if os.path.isdir(args.model) and not os.path.isdir(sibling) else sibling
    if args.drafter is not None:
        drafter_name = args.drafter
    if args.no_draft:
        drafter_name = None
    if drafter_name is None and not args.no_draft and args.drafter is None:
        print(f"gemma4-jax: no drafter for a local model (no {args.model.rstrip('/')}-assistant next to it); "
              "pass --drafter DIR (decoding plainly)", file=sys.stderr)
    _enable_compilation_cache()

    tokenizer = tok_lib.load_tokenizer(model_dir)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        text = tok_lib.format_chat(messages, template=tok_lib.chat_template_of(model_dir))
        ids = tokenizer.encode(text, add_bos=False)
    else:
        ids = tokenizer.encode(prompt, add_bos=True)
    model = gemma4_jax.load(model_dir, dtype=args.dtype)
    drafter = gemma4_jax.load(resolve(drafter_name, "drafter"), dtype=args.dtype) if drafter_name else None

    stream = Stream(model, [ids], drafter=drafter, max_new_tokens=args.max_new_tokens,
                    num_draft_tokens=args.num_draft_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    decoder = tok_lib.StreamDecoder(tokenizer)
    stop = set(_stop_tokens(model, None))  # a stop token can only be a row's last token
    if not args.json and not args.chat:
        sys.stdout.write(prompt)
    for chunk in stream:
        piece = decoder.push([t for t in chunk[0] if t not in stop])
        if not args.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tokens = stream.result.tokens[0]
    stats = stream.result.stats
    if args.json:
        text = tokenizer.decode([t for t in tokens if t not in stop])
        print(json.dumps({"text": text, "tokens": tokens, "stats": stats}))
        return 0
    sys.stdout.write(decoder.flush() + "\n")
    rate = f", acceptance {stats['acceptance_rate']:.0%}" if stats["proposed_drafts"] else ""
    compiled = f"; compiled in {stats['compile_seconds']:.1f}s" if stats["compile_seconds"] >= 0.05 else ""
    print(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f}s, {stats['tokens_per_second']:.1f} tok/s, "
          f"{stats['mean_tokens_per_step']:.2f} tokens/verify step{rate}{compiled}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = _Parser(prog="gemma4-jax", description="Gemma 4 in JAX: speculative generation, drafter training.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    add_generate_args(sub.add_parser("generate", help="generate text (speculative with the drafter)"))
    try:
        from gemma4_jax import train
    except ImportError:
        train = None
    if train is not None and hasattr(train, "add_train_drafter_args"):
        train.add_train_drafter_args(sub.add_parser("train-drafter", help="distil a drafter for a target"))
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: generate" + (", train-drafter" if train is not None else ""))
        if args.command == "generate":
            return run_generate(args)
        return train.run_train_drafter(args)
    except UsageError as e:
        print(f"gemma4-jax: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly (before OSError, its base)
        try:  # Python's own flush of stdout at exit would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (e.g. captured)
            pass
        return 1
    except (ValueError, OSError, ImportError) as e:  # ConfigError / CheckpointError are ValueErrors
        print(f"gemma4-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
