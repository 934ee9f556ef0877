"""The demo's training corpus: the Python standard library's own source, which every CPython install has.

A manifest records the exact files (relative path, sha256, size) and a train / held-out split, so a
run on another machine either reads byte-identical text or fails naming the files that differ
(another CPython version or distribution ships different sources). `train_tokenizer` trains the
demo's sentencepiece model on the train split with Gemma 4's special-token layout.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import platform
import sysconfig
import warnings
from collections.abc import Iterator

MAX_FILE_BYTES = 200_000
HELDOUT_FRACTION = 0.05
# Path components that mark test code and data (test/, tests/, idlelib/idle_test, lib2to3/tests, ...).
_TEST_DIRS = {"test", "tests", "idle_test"}
_SITE_DIRS = {"site-packages", "dist-packages"}

# Gemma 4's special tokens that have fixed ids below 107 (gemma4-spec.md §8.3); every other id in
# 4..106 is `<mask>` (4) or an `<unused_N>` filler so that these land on the same ids as Gemma 4's.
GEMMA4_SPECIAL_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49, "<|tool_response>": 50,
    "<tool_response|>": 51, '<|"|>': 52, "<|think|>": 98, "<|channel>": 100, "<channel|>": 101,
    "<|turn>": 105, "<turn|>": 106,
}
NUM_RESERVED = 107  # ids 0..106


class CorpusMismatchError(ValueError):
    """The local standard library's sources differ from the manifest's."""


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _generated(path: str) -> bool:
    """Files that are generated tables or per-machine build data rather than written code."""
    name = os.path.basename(path)
    if name.startswith("_sysconfigdata_"):           # this build's configure results
        return True
    with open(path, "rb") as f:
        head = f.read(300)
    # encodings/cp1252.py & co.: 256-entry charmap tables written by gencodec.py (~10% of the bytes).
    return b"Python Character Mapping Codec" in head and b"gencodec.py" in head


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted relative POSIX paths of the standard library's `.py` sources under `root` (default: this
    interpreter's `sysconfig.get_paths()["stdlib"]`).

    Excluded: site-/dist-packages, test directories (`test/`, `tests/`, `idle_test/`), the build's
    `config-*` directory and `_sysconfigdata_*` (machine-specific), gencodec charmap tables in
    `encodings/`, files over `MAX_FILE_BYTES`, and files that are not UTF-8.
    """
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        dirnames[:] = [d for d in dirnames
                       if d not in _TEST_DIRS and d not in _SITE_DIRS and d != "__pycache__"
                       and not (not parts and d.startswith("config-"))]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or os.path.islink(path) or not os.path.isfile(path):
                continue
            if os.path.getsize(path) > MAX_FILE_BYTES or _generated(path):
                continue
            with open(path, "rb") as f:
                try:
                    f.read().decode("utf-8")
                except UnicodeDecodeError:
                    continue
            out.append("/".join(parts + [name]))
    return sorted(out)


def split_of(rel_path: str) -> str:
    """'heldout' for ~HELDOUT_FRACTION of paths, chosen by a hash of the path (not the content, so a
    file keeps its split across Python versions), else 'train'."""
    h = int.from_bytes(hashlib.sha256(b"gemma4-jax-heldout:" + rel_path.encode()).digest()[:8], "big")
    return "heldout" if h / 2.0**64 < HELDOUT_FRACTION else "train"


def build_manifest(root: str | None = None) -> dict:
    root = root or stdlib_root()
    files = []
    for rel in stdlib_files(root):
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            data = f.read()
        files.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                      "split": split_of(rel)})
    return {"python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "stdlib_root": root, "files": files}


def write_manifest(path: str, root: str | None = None) -> dict:
    """Writes the manifest JSON {python_version, stdlib_root, files: [{path, sha256, bytes, split}]}
    to `path` and returns it."""
    manifest = build_manifest(root)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def _load(manifest) -> dict:
    if isinstance(manifest, dict):
        return manifest
    with open(manifest, encoding="utf-8") as f:
        return json.load(f)


def _entries(manifest: dict, split: str) -> list[dict]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return [e for e in manifest["files"] if split == "all" or e["split"] == split]


def _read(root: str, entry: dict) -> bytes | None:
    try:
        with open(os.path.join(root, *entry["path"].split("/")), "rb") as f:
            return f.read()
    except OSError:
        return None


def read_corpus(manifest, split: str = "train", *, strict: bool = True,
                root: str | None = None) -> Iterator[tuple[str, str]]:
    """Yields (relative path, text) of the manifest's files in `split` ('train', 'heldout' or 'all'),
    read from `root` (default: this interpreter's standard library).

    `manifest` is a path or the loaded dict. Every file is checked against its recorded sha256 before
    anything is yielded: a missing or different file raises `CorpusMismatchError` naming the files.
    With `strict=False` it warns instead, skips missing files and yields the local text of changed ones.
    """
    manifest = _load(manifest)
    root = root or stdlib_root()
    entries = _entries(manifest, split)
    bad = []
    for e in entries:
        data = _read(root, e)
        if data is None:
            bad.append(f"{e['path']} (missing)")
        elif hashlib.sha256(data).hexdigest() != e["sha256"]:
            bad.append(f"{e['path']} (sha256 differs)")
    if bad:
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
        msg = (f"{len(bad)} of {len(entries)} corpus files under {root} do not match the manifest "
               f"(written with Python {manifest.get('python_version')}, this is "
               f"{platform.python_version()}): {shown}")
        if strict:
            raise CorpusMismatchError(msg + "; pass strict=False to use the local files anyway")
        warnings.warn(msg, stacklevel=2)
    return _iter(root, entries)


def _iter(root: str, entries: list[dict]) -> Iterator[tuple[str, str]]:
    for e in entries:
        data = _read(root, e)
        if data is not None:
            yield e["path"], data.decode("utf-8")


def special_pieces() -> list[str]:
    """The pieces of ids 4..106, in id order: Gemma 4's fixed specials and `<unused_N>` fillers."""
    by_id = {i: p for p, i in GEMMA4_SPECIAL_IDS.items()}
    out, n = [], 0
    for i in range(4, NUM_RESERVED):
        if i in by_id:
            out.append(by_id[i])
        else:
            out.append(f"<unused_{n}>")
            n += 1
    return out


def _chunks(texts, max_chars: int) -> Iterator[str]:
    """Cuts texts into training sentences of at most `max_chars`, at line ends where possible, keeping
    every character (newlines and indentation included) so pieces may span them."""
    for text in texts:
        start = 0
        while start < len(text):
            end = min(start + max_chars, len(text))
            if end < len(text):
                cut = text.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            yield text[start:end]
            start = end


def train_tokenizer(manifest, out_prefix: str, vocab_size: int = 4096, *, split: str = "train",
                    max_files: int | None = None, max_sentences: int = 40_000,
                    model_type: str = "bpe", num_threads: int = 2,
                    root: str | None = None, strict: bool = True) -> str:
    """Trains the demo's sentencepiece model on the corpus; writes `{out_prefix}.model` and
    `{out_prefix}.vocab` (one JSON-quoted piece and its score per line) and returns the .model path.

    Token layout (Gemma 4's): `<pad>`0 `<eos>`1 `<bos>`2 `<unk>`3 `<mask>`4, then user-defined pieces
    so that `<|tool>`46 `<tool|>`47 `<|tool_call>`48 `<tool_call|>`49 `<|tool_response>`50
    `<tool_response|>`51 `<|"|>`52 `<|think|>`98 `<|channel>`100 `<channel|>`101 `<|turn>`105
    `<turn|>`106 sit at Gemma 4's ids (the gaps are `<unused_0>`..`<unused_89>`); then the 256 byte
    pieces `<0x00>`..`<0xFF>` (ids 107..362), then the learned pieces. pad/eos/bos/unk are control
    symbols (`encode` maps their literal text, sentencepiece itself never emits them); ids 4..106 are
    user-defined symbols, which sentencepiece always encodes atomically from text.

    sentencepiece parameters: model_type="bpe"; byte_fallback=True (any text encodes: characters
    outside the vocabulary become UTF-8 byte pieces); character_coverage=0.9999;
    normalization_rule_name="identity" (the default nmt_nfkc turns newlines and tabs into spaces);
    remove_extra_whitespaces=False; add_dummy_prefix=False (no invented leading space, so
    decode(encode(x)) == x exactly and token streams concatenate); split_digits=True;
    allow_whitespace_only_pieces=True (indentation runs become single pieces);
    split_by_whitespace=False and split_by_unicode_script=False (pieces may span spaces, punctuation
    and line ends, e.g. `):\n▁▁▁▁▁▁▁▁return`); max_sentencepiece_length=16;
    max_sentence_length=8192 (bytes); input_sentence_size=`max_sentences`; shuffle_input_sentence=True;
    num_threads=2 (the learned merges depend on the thread count: keep it fixed to reproduce a model).

    Why these (CPython 3.11.7, vocab 4096, tokens per byte on the held-out files): this setting 0.249
    in ~3 s on 2 cores; with whitespace splitting 0.295 (0.272 when only unicode-script splitting is
    off); unigram with whitespace splitting 0.295 in 62 s, and without it no result in 5 minutes.

    Sentences: each file is cut at line ends into chunks of <= 2000 characters, newlines kept (a
    line-per-sentence file input would lose them); at most `max_sentences` chunks are used
    (`input_sentence_size`; the whole stdlib is ~5,000 chunks, so by default nothing is sampled away).
    `max_files` limits the files (tests).
    """
    import sentencepiece as spm

    manifest = _load(manifest)
    texts = (text for _, text in read_corpus(manifest, split, strict=strict, root=root))
    if max_files is not None:
        texts = itertools.islice(texts, max_files)
    sentences = list(_chunks(texts, 2000))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=special_pieces(),
        byte_fallback=True, character_coverage=0.9999,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, split_by_whitespace=False,
        split_by_unicode_script=False,
        max_sentencepiece_length=16, max_sentence_length=8192,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=num_threads, minloglevel=2)
    path = out_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(out_prefix + ".vocab", "w", encoding="utf-8") as f:  # pieces may hold newlines: JSON strings
        for i in range(sp.get_piece_size()):
            f.write(f"{json.dumps(sp.id_to_piece(i), ensure_ascii=False)}\t{sp.get_score(i)}\n")
    for piece, i in GEMMA4_SPECIAL_IDS.items():  # the layout is the point of this function
        if sp.piece_to_id(piece) != i:
            raise RuntimeError(f"sentencepiece put {piece} at id {sp.piece_to_id(piece)}, not {i}")
    return path


def heldout_prompts(tokenizer, manifest, count: int = 24, tokens: int = 64) -> list[list[int]]:
    """Prompts (token-id lists starting with <bos>) from held-out files: each file's text up to and
    including its first `def ` / `class ` line past the first few lines, keeping the last `tokens`
    tokens. Deterministic (manifest order)."""
    prompts = []
    for _, text in read_corpus(manifest, "heldout"):
        lines = text.splitlines(keepends=True)
        cut = next((i for i, line in enumerate(lines) if i > 5 and line.lstrip().startswith(("def ", "class "))),
                   None)
        if cut is None:
            continue
        ids = tokenizer.encode("".join(lines[: cut + 1]), add_bos=False)[-(tokens - 1):]
        prompts.append([tokenizer.bos_id] + ids)
        if len(prompts) == count:
            break
    return prompts
