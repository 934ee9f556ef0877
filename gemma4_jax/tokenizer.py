"""Tokenizers (sentencepiece `tokenizer.model`, or Hugging Face `tokenizer.json`) and the Gemma 4 chat format.

Both backends give the same interface and the same conventions as transformers' fast tokenizers:
special-token text inside a string (`<bos>`, `<|turn>`, ...) encodes to its single id, `decode` shows
special tokens unless `skip_special=True`, and nothing is added except the `<bos>` of `add_bos`.
"""

from __future__ import annotations

import json
import os
import re

# Gemma-style special-token text: <pad> <eos> <bos> <unk> <mask>, <unused_N>/<unusedN>, and the
# <|...> / <...|> markers (<|turn>, <turn|>, <|"|>, <|think|>, ...). Used to decide what
# `skip_special` drops: some files mark the turn markers as plain (non-special) pieces.
_SPECIAL_TEXT = re.compile(r"<(?:pad|eos|bos|unk|mask|unused_?\d+)>|<\|[^<>\s]*>|<[^<>\s]*\|>")


class Tokenizer:
    """A loaded tokenizer (use `load_tokenizer`). The two backends below supply `_encode`, `_decode`
    and the piece lookups; BOS handling, `skip_special` and streaming are shared here."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_ids: frozenset

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text inside it maps to the special ids. `add_bos` prepends
        `<bos>` unless the text already starts with it (e.g. a formatted chat), so BOS is never doubled."""
        ids = self._encode(text)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear as their text unless `skip_special`. Incomplete UTF-8
        sequences become U+FFFD (use `StreamDecoder` for text that is still growing)."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._decode(ids)

    def decode_stream(self, *, skip_special: bool = False) -> "StreamDecoder":
        """A `StreamDecoder` over this tokenizer, for printing text while tokens are generated."""
        return StreamDecoder(self, skip_special=skip_special)

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """`tokenizer.model`. sentencepiece never emits control pieces (pad/eos/bos) from text and decodes
    them to nothing, so their text is split out here and decoding is done from the pieces directly."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
        self._pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._bytes = {i: int(self._pieces[i][3:5], 16) for i in range(self.vocab_size) if sp.is_byte(i)}
        # Text of control and unknown pieces: mapped to their ids by hand, like HF's added tokens.
        self._control = {self._pieces[i]: i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        self._control_re = (re.compile("|".join(re.escape(p) for p in sorted(self._control, key=len, reverse=True)))
                            if self._control else None)
        self.special_ids = frozenset(
            i for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
            or (_SPECIAL_TEXT.fullmatch(self._pieces[i]) and not sp.is_byte(i)))
        # Models trained with add_dummy_prefix add a space in front of the text; decoding drops it.
        self._dummy_prefix = sp.encode("a", out_type=str)[:1] == ["\u2581a"]

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self._pieces[i] == piece else None

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]

    def _encode(self, text: str) -> list[int]:
        if self._control_re is None:
            return self.sp.encode(text)
        ids, start = [], 0
        for m in self._control_re.finditer(text):
            if m.start() > start:
                ids += self.sp.encode(text[start:m.start()])
            ids.append(self._control[m.group()])
            start = m.end()
        if start < len(text):
            ids += self.sp.encode(text[start:])
        return ids

    def _decode(self, ids: list[int]) -> str:
        out, first = bytearray(), True
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            b = self._bytes.get(i)
            if b is not None:
                out.append(b)
            else:
                piece = self._pieces[i].replace("\u2581", " ")
                if first and self._dummy_prefix and i not in self.special_ids and piece.startswith(" "):
                    piece = piece[1:]
                out += piece.encode("utf-8")
            first = first and i in self.special_ids
        return out.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """`tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: str, config: dict | None = None):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"{path} needs the `tokenizers` library: pip install tokenizers") from e
        self.path = path
        self.tok = tok = tokenizers.Tokenizer.from_file(path)
        config = config or {}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

        def special(name, default):
            value = config.get(name) or default
            return tok.token_to_id(value["content"] if isinstance(value, dict) else value)

        self.bos_id, self.eos_id, self.pad_id = (special("bos_token", "<bos>"), special("eos_token", "<eos>"),
                                                 special("pad_token", "<pad>"))
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special or _SPECIAL_TEXT.fullmatch(t.content))

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int]) -> str:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self.tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of a checkpoint directory: `tokenizer.model` (sentencepiece) when present, else
    `tokenizer.json` (needs `tokenizers`). A path to either file also works."""
    model_dir = os.fspath(model_dir)
    if os.path.isfile(model_dir):
        path, model_dir = model_dir, os.path.dirname(model_dir)
    elif os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        path = os.path.join(model_dir, "tokenizer.model")
    elif os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        path = os.path.join(model_dir, "tokenizer.json")
    else:
        raise FileNotFoundError(f"no tokenizer in {model_dir}: expected tokenizer.model (sentencepiece) or "
                                "tokenizer.json (Hugging Face tokenizers)")
    config = _tokenizer_config(model_dir) if path.endswith(".json") else None
    try:
        return HFTokenizer(path, config) if config is not None else SentencePieceTokenizer(path)
    except ImportError:
        raise  # says what to install
    except Exception as e:  # sentencepiece / tokenizers raise their own types for a corrupt file
        raise ValueError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _tokenizer_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


class StreamDecoder:
    """Turns a growing list of token ids into newly printable text, for streaming output.

    Text is held back while it ends in an incomplete UTF-8 sequence (byte-fallback pieces of one
    character arrive as several tokens). Each step decodes a short window that starts a few tokens
    back, so a decoder's context effects (sentencepiece's leading space) match a full decode:
    `"".join(outputs) + flush()` equals `decode(all_ids)`.

        stream = StreamDecoder(tok)
        for ids in growing_lists:         # or stream.push(new_ids)
            print(stream.update(ids), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0   # window start: text of ids[_prefix:_read] has been emitted
        self._read = 0

    def _text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, new_ids) -> str:
        """Appends `new_ids`; returns the text that became printable."""
        self.ids.extend(int(i) for i in new_ids)
        if len(self.ids) == self._read:
            return ""
        done = self._text(self.ids[self._prefix:self._read])
        text = self._text(self.ids[self._prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def update(self, ids) -> str:
        """Takes the whole growing list (which must extend the previous one); returns the new text."""
        if len(ids) < len(self.ids):
            raise ValueError(f"the token list shrank from {len(self.ids)} to {len(ids)} ids")
        return self.push(list(ids)[len(self.ids):])

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes as U+FFFD)."""
        done = self._text(self.ids[self._prefix:self._read])
        text = self._text(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]


# ----------------------------------------------------------------------------------------- chat

_ROLES = {"user": "user", "assistant": "model", "model": "model"}
_THOUGHT = re.compile(r"<\|channel>.*?<channel\|>", re.DOTALL)


def _content_text(message: dict, model: bool = False) -> str:
    content = message.get("content") or ""
    parts = [content] if isinstance(content, str) else []
    for part in [] if isinstance(content, str) else content:
        if isinstance(part, str):
            parts.append(part)
        elif part.get("type") == "text":
            parts.append(part["text"])
        else:
            raise ValueError(f"message part of type {part.get('type')!r} is not supported (text only)")
    # As Gemma 4's template: earlier thoughts are dropped from model turns, and every text is trimmed.
    return "".join(_THOUGHT.sub("", p).strip() if model else p.strip() for p in parts)


def format_chat(messages, *, template: str | None = None, add_generation_prompt: bool = True,
                thinking: bool = False, bos_token: str = "<bos>", eos_token: str = "<eos>") -> str:
    """The prompt text of a conversation: a list of {"role": system|developer|user|assistant|model,
    "content": str or [{"type": "text", "text": ...}]}. Encode it with `tokenizer.encode(text)` (its
    `<bos>` is kept, not doubled).

    With `template` (a checkpoint's Jinja chat template, see `chat_template_of`) it is rendered with
    jinja2 as transformers does (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
    `enable_thinking`). Otherwise the built-in Gemma 4 format, as Gemma 4's own template renders text
    turns (texts trimmed; `<|channel>...<channel|>` thoughts dropped from earlier model turns):

        <bos><|turn>system\n[<|think|>\n]{system}<turn|>\n     (when there is a system message or thinking)
        <|turn>user\n{text}<turn|>\n
        <|turn>model\n{text}<turn|>\n
        <|turn>model\n[<|channel>thought\n<channel|>]       (add_generation_prompt; the closed, empty
                                                              thought channel when thinking is off)

    The empty thought channel is what the 12B/26B/31B templates emit; the E2B/E4B ones end at
    `<|turn>model\n`, so pass a checkpoint's own template when it ships one.
    """
    messages = list(messages)
    if template is not None:
        return _render(template, messages, add_generation_prompt=add_generation_prompt, thinking=thinking,
                       bos_token=bos_token, eos_token=eos_token)
    out = [bos_token]
    system = None
    if messages and messages[0].get("role") in ("system", "developer"):
        system, messages = _content_text(messages[0]), messages[1:]
    if system is not None or thinking:
        out.append("<|turn>system\n" + ("<|think|>\n" if thinking else "") + (system or "") + "<turn|>\n")
    for m in messages:
        role = _ROLES.get(m.get("role"))
        if role is None:
            raise ValueError(f"message role {m.get('role')!r} is not supported here: a system message may only "
                             "come first; the others must be 'user', 'assistant' or 'model'")
        out.append(f"<|turn>{role}\n{_content_text(m, model=role == 'model')}<turn|>\n")
    if add_generation_prompt:
        out.append("<|turn>model\n" + ("" if thinking else "<|channel>thought\n<channel|>"))
    return "".join(out)


def _render(template: str, messages, *, thinking: bool, **kwargs) -> str:
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("rendering a chat template needs jinja2: pip install jinja2") from e
    import datetime

    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # Older versions have known sandbox escapes, and checkpoint templates are untrusted code.
        raise ImportError(f"rendering a chat template needs jinja2>=3.1.6 (found {jinja2.__version__}): "
                          "pip install -U jinja2")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: they lead to CPython internals
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    # The environment of transformers' apply_chat_template, so templates render the same.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(template).render(messages=messages, enable_thinking=thinking, tools=None,
                                            documents=None, **kwargs)


def chat_template_of(model_dir: str) -> str | None:
    """The chat template a checkpoint ships: `chat_template.jinja`, else `chat_template` in
    `tokenizer_config.json` (a string, or a list of named templates: the one named "default"); None when
    there is none."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = _tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template or None
