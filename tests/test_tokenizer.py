"""Tokenizer, chat format and the stdlib corpus: layout, exact round trips, streaming, manifests, errors."""

import json
import os
import random
import shutil
import sys

import pytest

from gemma4_jax import corpus
from gemma4_jax.tokenizer import StreamDecoder, chat_template_of, format_chat, load_tokenizer

# Text the stdlib lacks (it has no tabs, CRs or characters outside the BMP): byte fallback must carry it.
ODD_TEXT = ("def f(x):\n\tif x:\r\n\t\treturn 'héllo wörld 😀 中文 ✓ \x00\x0c'\n\n\n  \n   trailing   \n"
            "<|turn>user\n<bos><not_special> <|unknown|>\n")


@pytest.fixture(scope="module")
def manifest():
    return corpus.build_manifest()


@pytest.fixture(scope="module")
def sp_dir(manifest, tmp_path_factory):
    """A small tokenizer (vocab 1000) trained on the first 80 training files; ~0.5 s."""
    out = tmp_path_factory.mktemp("sp")
    corpus.train_tokenizer(manifest, str(out / "tokenizer"), vocab_size=1000, max_files=80)
    return str(out)


@pytest.fixture(scope="module")
def tok(sp_dir):
    return load_tokenizer(sp_dir)


def _real_files(manifest, n=6):
    """Several real sources: the most non-ASCII ones plus large, deeply indented ones."""
    texts = dict(corpus.read_corpus(manifest, "all"))
    by_unicode = sorted(texts, key=lambda p: -sum(ord(c) > 127 for c in texts[p]))[:3]
    by_size = sorted(texts, key=lambda p: -len(texts[p]))[:n - 3]
    return {p: texts[p] for p in by_unicode + by_size}


def test_special_tokens_sit_at_gemma4_ids(tok):
    for piece, i in corpus.GEMMA4_SPECIAL_IDS.items():
        assert tok.piece_to_id(piece) == i and tok.id_to_piece(i) == piece
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.vocab_size == 1000
    assert tok.piece_to_id("<unused_0>") == 5 and tok.piece_to_id("<unused_89>") == 104
    assert tok.piece_to_id("<0x00>") == 107 and tok.piece_to_id("<0xFF>") == 362
    assert tok.piece_to_id("no such piece") is None
    assert set(range(107)) <= tok.special_ids and not tok.special_ids & set(range(107, 1000))


def test_training_is_deterministic(manifest, sp_dir, tmp_path):
    corpus.train_tokenizer(manifest, str(tmp_path / "again"), vocab_size=1000, max_files=80)
    with open(os.path.join(sp_dir, "tokenizer.model"), "rb") as a, open(tmp_path / "again.model", "rb") as b:
        assert a.read() == b.read()


def test_round_trip_is_exact_on_stdlib_files_and_odd_text(tok, manifest):
    for path, text in list(_real_files(manifest).items()) + [("odd", ODD_TEXT)]:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text, path
        assert tok.encode(text) == [tok.bos_id] + ids
        plain = [i for i in ids if i not in tok.special_ids]
        if plain == ids:  # sentencepiece's own decoder agrees with ours
            assert tok.sp.decode(ids) == text, path
    ids = tok.encode("    if x:\n        return y\n", add_bos=False)
    assert len(ids) < 15  # indentation runs are pieces, not one token per space


def test_special_token_text_encodes_to_single_ids_inside_text(tok):
    ids = tok.encode("a<|turn>user\nhi<turn|>\n<bos>b<eos><|think|><|channel><channel|><|\"|><mask>", add_bos=False)
    for piece in ["<|turn>", "<turn|>", "<bos>", "<eos>", "<|think|>", "<|channel>", "<channel|>", '<|"|>', "<mask>"]:
        assert ids.count(tok.piece_to_id(piece)) == 1, piece
    assert tok.decode(ids, skip_special=True) == "auser\nhi\nb"
    assert tok.encode("<bos>x") == tok.encode("x")  # an explicit <bos> is not doubled
    assert tok.decode([2, 105]) == "<bos><|turn>"


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match="1000 is outside the vocabulary"):
        tok.decode([5, 1000])


def test_stream_decoder_concatenation_equals_full_decode_at_random_cut_points(tok, manifest):
    text = ODD_TEXT + next(iter(_real_files(manifest).values()))[:4000]
    ids = tok.encode(text)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # multi-token characters are exercised
    rng = random.Random(0)
    for skip in (False, True):
        full = tok.decode(ids, skip_special=skip)
        for _ in range(20):
            stream, out, n = StreamDecoder(tok, skip_special=skip), [], 0
            while n < len(ids):
                n = min(len(ids), n + rng.randint(1, 5))
                out.append(stream.update(ids[:n]))
            out.append(stream.flush())
            assert "".join(out) == full
            assert not any("\ufffd" in piece for piece in out)  # never prints half a character
    stream = tok.decode_stream()
    assert stream.push(tok.encode("😀", add_bos=False)[:2]) == ""  # held back mid-character
    with pytest.raises(ValueError, match="shrank"):
        stream.update([])


def test_builtin_chat_format_strings_and_ids(tok):
    user = [{"role": "user", "content": "hi"}]
    assert format_chat(user) == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert format_chat(user, thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n")
    assert format_chat(user, add_generation_prompt=False) == "<bos><|turn>user\nhi<turn|>\n"
    convo = [{"role": "system", "content": "Be brief.\n"},
             {"role": "user", "content": [{"type": "text", "text": " q"}]},
             {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>a"}, {"role": "user", "content": "q2"}]
    assert format_chat(convo, thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nq<turn|>\n<|turn>model\na<turn|>\n"
        "<|turn>user\nq2<turn|>\n<|turn>model\n")
    assert format_chat(convo[:2]) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nq<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")

    def enc(s):
        return tok.encode(s, add_bos=False)

    assert tok.encode(format_chat(user)) == (
        [2, 105] + enc("user\nhi") + [106] + enc("\n") + [105] + enc("model\n") + [100] + enc("thought\n") + [101])
    assert tok.encode(format_chat(user, thinking=True)) == (
        [2, 105] + enc("system\n") + [98] + enc("\n") + [106] + enc("\n") + [105] + enc("user\nhi") + [106]
        + enc("\n") + [105] + enc("model\n"))
    with pytest.raises(ValueError, match="system message may only come first"):
        format_chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


# The text-turn logic of Gemma 4's published chat template, condensed (no tools or images).
GEMMA_LIKE_TEMPLATE = """{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if enable_thinking or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}
    {%- if enable_thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\n' -}}
    {%- if role == 'model' -%}
        {%- set ns = namespace(result='') -%}
        {%- for part in message['content'].split('<channel|>') -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- endfor -%}
        {{- ns.result | trim -}}
    {%- else -%}
        {{- message['content'] | trim -}}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
    {%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}"""


def test_jinja_template_renders_like_the_builtin_format_and_like_transformers():
    convo = [{"role": "system", "content": " S "}, {"role": "user", "content": "q\n"},
             {"role": "assistant", "content": "<|channel>thought\nx<channel|> a"}, {"role": "user", "content": "q2"}]
    for thinking in (False, True):
        for messages in (convo, convo[1:]):
            for prompt in (False, True):
                kw = dict(thinking=thinking, add_generation_prompt=prompt)
                assert format_chat(messages, template=GEMMA_LIKE_TEMPLATE, **kw) == format_chat(messages, **kw)
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    for thinking in (False, True):
        (hf,), _ = render_jinja_template([convo], chat_template=GEMMA_LIKE_TEMPLATE, add_generation_prompt=True,
                                         bos_token="<bos>", enable_thinking=thinking)
        assert format_chat(convo, template=GEMMA_LIKE_TEMPLATE, thinking=thinking) == hf


def test_jinja_sandbox_blocks_underscore_attributes():
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        format_chat([], template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        format_chat([], template="{{ raise_exception('no tools') }}")


def test_chat_template_of_prefers_the_jinja_file(tmp_path):
    assert chat_template_of(str(tmp_path)) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "B"}))
    assert chat_template_of(str(tmp_path)) == "B"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert chat_template_of(str(tmp_path)) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert chat_template_of(str(tmp_path)) == "J"


def test_manifest_is_deterministic_with_a_disjoint_nonempty_heldout_split(manifest, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    corpus.write_manifest(str(a))
    corpus.write_manifest(str(b))
    assert a.read_bytes() == b.read_bytes()
    loaded = json.loads(a.read_text())
    assert loaded == manifest
    assert set(loaded) >= {"python_version", "stdlib_root", "files"}
    paths = [e["path"] for e in loaded["files"]]
    assert paths == sorted(paths) == corpus.stdlib_files()
    assert len(paths) > 300
    assert not any(part in ("test", "tests", "idle_test", "site-packages", "dist-packages")
                   for p in paths for part in p.split("/"))
    assert all(e["bytes"] <= corpus.MAX_FILE_BYTES for e in loaded["files"])
    train = [p for p, _ in corpus.read_corpus(a, "train")]
    heldout = [p for p, _ in corpus.read_corpus(a, "heldout")]
    assert heldout and not set(train) & set(heldout) and sorted(train + heldout) == paths
    assert 0.02 < len(heldout) / len(paths) < 0.1
    assert all(corpus.split_of(p) == "heldout" for p in heldout)  # chosen by path alone


def test_changed_or_missing_corpus_files_raise_an_error_naming_them(tmp_path):
    root = tmp_path / "stdlib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    for name in ("a.py", "b.py", "pkg/c.py", "test/skipped.py"):
        (root / name).write_text(f"# {name}\nx = 1\n")
    manifest = corpus.build_manifest(str(root))
    assert [e["path"] for e in manifest["files"]] == ["a.py", "b.py", "pkg/c.py"]
    (root / "pkg" / "c.py").write_text("x = 2\n")
    (root / "b.py").unlink()
    with pytest.raises(corpus.CorpusMismatchError, match=r"pkg/c\.py \(sha256 differs\)") as e:
        corpus.read_corpus(manifest, "all", root=str(root))
    assert "b.py (missing)" in str(e.value) and " a.py (" not in str(e.value)
    with pytest.warns(UserWarning, match="pkg/c.py"):
        got = dict(corpus.read_corpus(manifest, "all", root=str(root), strict=False))
    assert got == {"a.py": "# a.py\nx = 1\n", "pkg/c.py": "x = 2\n"}
    with pytest.raises(ValueError, match="split must be"):
        corpus.read_corpus(manifest, "test", root=str(root))


def test_missing_tokenizer_files_error_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {tmp_path}.*tokenizer.model.*tokenizer.json"):
        load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def hf_dir(sp_dir, tmp_path_factory):
    """tokenizer.json (+ tokenizer_config.json) converted from the sentencepiece model by transformers."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf")
    transformers.GemmaTokenizer.from_pretrained(sp_dir).save_pretrained(str(out))
    assert not os.path.exists(out / "tokenizer.model")
    return str(out)


def test_tokenizer_json_backend_matches_sentencepiece(tok, hf_dir, manifest):
    hf = load_tokenizer(hf_dir)
    assert type(hf).__name__ == "HFTokenizer"
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
    assert hf.special_ids == tok.special_ids
    chat = format_chat([{"role": "user", "content": "hi"}], thinking=True)
    for text in list(_real_files(manifest, 4).values()) + [ODD_TEXT, chat]:
        ids = tok.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special=True) == tok.decode(ids, skip_special=True)
    ids = tok.encode(ODD_TEXT)
    stream = StreamDecoder(hf)
    assert "".join(stream.push([i]) for i in ids) + stream.flush() == hf.decode(ids)


def test_tokenizer_json_without_the_library_says_what_to_install(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(hf_dir)


def test_load_tokenizer_accepts_a_file_path(sp_dir, tmp_path):
    shutil.copy(os.path.join(sp_dir, "tokenizer.model"), tmp_path / "x.model")
    assert load_tokenizer(str(tmp_path / "x.model")).encode("x = 1") == load_tokenizer(sp_dir).encode("x = 1")
