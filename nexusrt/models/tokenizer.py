"""Tokenizers: HF ``tokenizer.json`` through ``tokenizers``, a byte tokenizer for synthetic
models, and incremental detokenisation for streaming.

BOS handling follows HF: the ``tokenizer.json`` post-processor adds specials when it
has one (Llama 3); ``add_bos_token: true`` in tokenizer_config.json makes sure the BOS
id leads (Llama 2 style). Chat prompts are rendered text that already holds its special
tokens, so they are encoded with ``add_special_tokens=False``, as HF does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import ModelError
from .chat import render_chat
from .jsonfile import read_bytes, read_json_object
from .paths import CheckpointDir
from .validate import Fields

MAX_TOKENIZER_BYTES = 128 * 1024 * 1024  # the biggest real tokenizer.json files are ~35 MB
MAX_TEMPLATE_BYTES = 1024 * 1024


class BaseTokenizer:
    """What the engine needs from a tokenizer."""

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    special_tokens: dict = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def min_tokens(self, text: str) -> int:
        """A lower bound on the ids ``text`` encodes to, found without encoding it (0: none known),
        so a prompt far over the context is refused before seconds and gigabytes of tokenizing."""
        return 0

    def invisible(self, token_id: int) -> bool:
        """True when ``token_id`` never adds text in any context (streaming may skip it)."""
        return False

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The rendered chat prompt (text) for ``messages``."""
        if not self.chat_template:
            raise ModelError(f"{self.source}: this tokenizer has no chat_template")
        return render_chat(self.chat_template, messages, add_generation_prompt, source=self.template_source,
                           **self.special_tokens)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    source = "tokenizer"
    template_source = "chat template"


def _token_text(cfg: Fields, key: str) -> str:
    """tokenizer_config.json writes special tokens as strings or as AddedToken objects."""
    if not cfg.has(key):
        return ""
    if isinstance(cfg.d[key], dict):
        return cfg.obj(key).str("content")
    return cfg.str(key)


def _chat_template(files: CheckpointDir, cfg: Fields) -> tuple[str | None, str]:
    """The chat template and the file it came from (``chat_template.jinja`` wins, as in HF)."""
    jinja_file = files.file("chat_template.jinja", required=False)
    if jinja_file is not None:
        raw = read_bytes(jinja_file, MAX_TEMPLATE_BYTES, "chat template")
        try:
            return raw.decode("utf-8"), str(jinja_file)
        except UnicodeDecodeError as exc:
            raise ModelError(f"{jinja_file}: not UTF-8 text ({exc})") from None
    source = f"{cfg.source} (chat_template)"
    template = cfg.d.get("chat_template")
    if isinstance(template, list):  # the older named-templates form
        named = {}
        for i, t in enumerate(template):
            entry = Fields(t, cfg.source, f"chat_template[{i}].")
            named[entry.str("name")] = entry.str("template")
        template = named.get("default") or next(iter(named.values()), None)
    elif template is not None:
        template = cfg.str("chat_template")
    if template is not None and len(template) > MAX_TEMPLATE_BYTES:
        raise ModelError(f"{source}: longer than the {MAX_TEMPLATE_BYTES}-character limit")
    return template, source


# The parts of a tokenizer.json pipeline after which a count of input bytes still bounds the
# tokens from below: none of them drops input. (Whitespace splitting, BERT's cleaning, stripping
# accents, or a BPE fusing unknown characters into one token could turn megabytes into a few ids.)
_KEEPING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace", "Sequence"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}
NORMALIZED_SHRINK = 4  # input bytes per normalized byte at most (NFKC maps the 4-byte U+1D400 to "A")


def _parts(state) -> list[dict]:
    """Every component of a normalizer / pre-tokenizer JSON state, Sequences unrolled."""
    out, todo = [], [state]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            out.append(node)
            todo.extend(v for k in ("normalizers", "pretokenizers") for v in node.get(k) or [])
    return out


def _bytes_per_token(tok) -> int | None:
    """The most input bytes one id of ``tok`` (a ``tokenizers.Tokenizer``) can stand for, or None
    where its pipeline may drop input (then the bytes bound nothing)."""
    model = tok.model
    if type(model).__name__ != "BPE" or (model.unk_token and model.fuse_unk and not model.byte_fallback):
        return None
    for part in _parts(json.loads(tok.normalizer.__getstate__()) if tok.normalizer else None):
        kind = part.get("type")
        pattern = (part.get("pattern") or {}).get("String")
        if kind not in _KEEPING_NORMALIZERS or (kind == "Replace" and (
                pattern is None or len(part.get("content") or "") < len(pattern))):
            return None
    shrink = NORMALIZED_SHRINK if tok.normalizer else 1  # Lowercase too: the Kelvin sign's 3 bytes -> "k"
    for part in _parts(json.loads(tok.pre_tokenizer.__getstate__()) if tok.pre_tokenizer else None):
        if part.get("type") not in _KEEPING_PRE_TOKENIZERS or part.get("behavior") == "Removed":
            return None
    # A token's text in the vocabulary is never shorter in UTF-8 than the input bytes it covers
    # (byte-level BPE writes each byte as one 1-2 byte character, byte fallback as "<0x41>").
    longest = max((len(s.encode("utf-8")) for s in tok.get_vocab(with_added_tokens=True)), default=1)
    return max(longest, 4) * shrink  # an unknown character alone is one id of up to 4 bytes


class HFTokenizer(BaseTokenizer):
    """``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``) of a checkpoint."""

    def __init__(self, model_dir: str | Path, files: CheckpointDir | None = None):
        from tokenizers import Tokenizer

        files = files or CheckpointDir(model_dir)
        path = files.file("tokenizer.json", required=False)
        self.source = str(files.root / "tokenizer.json")
        if path is None:
            raise ModelError(f"{self.source}: missing (needed to turn text into token ids)")
        raw = read_bytes(path, MAX_TOKENIZER_BYTES, "tokenizer")
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelError(f"{path}: cannot load: {exc}") from None
        cfg_path = files.file("tokenizer_config.json", required=False)
        cfg = Fields(read_json_object(cfg_path) if cfg_path else {}, str(cfg_path or files.root / "tokenizer_config.json"))
        self.special_tokens = {k: _token_text(cfg, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id = self._tok.token_to_id(self.special_tokens["bos_token"]) if self.special_tokens["bos_token"] else None
        eos = self._tok.token_to_id(self.special_tokens["eos_token"]) if self.special_tokens["eos_token"] else None
        self.eos_ids = () if eos is None else (eos,)
        self.add_bos = cfg.bool("add_bos_token", False)
        self.chat_template, self.template_source = _chat_template(files, cfg)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def _per_token(self) -> int | None:
        return _bytes_per_token(self._tok)  # on first need, not at load: it reads the whole vocabulary

    def min_tokens(self, text: str) -> int:
        if self._per_token is None:
            return 0
        return -(-len(text.encode("utf-8", errors="surrogatepass")) // self._per_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: the same ids, but it lets go of the GIL while it works, which
        # encode does not (a 4 MB prompt takes seconds; a server's event loop must go on meanwhile).
        ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class ByteTokenizer(BaseTokenizer):
    """Ids 0..255 are bytes (UTF-8), 256 is BOS, 257 is EOS; higher ids decode to nothing.

    Lets synthetic models take text prompts; random weights produce ids of any size.
    """

    BOS, EOS = 256, 257
    NAMES = {256: "<|bos|>", 257: "<|eos|>"}
    source = "byte tokenizer"
    chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

    def __init__(self):
        self.bos_id = self.BOS
        self.eos_ids = (self.EOS,)
        self.special_tokens = {"bos_token": self.NAMES[256], "eos_token": self.NAMES[257]}

    vocab_size = 258

    def invisible(self, token_id: int) -> bool:
        # Random weights pick ids far above 257; skipping them keeps streaming O(1) per token.
        return token_id >= 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def min_tokens(self, text: str) -> int:
        return len(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                run.append(i)
            elif i in self.NAMES and not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(self.NAMES[i])
            # An id that adds no text does not split the bytes around it either: `invisible` says
            # it never changes the text, and streaming skips it (it used to split a character).
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class IncrementalDecoder:
    """Turns a growing id sequence into text pieces whose concatenation is the full decode.

    Decoding a token alone is wrong for tokenizers whose pieces depend on their
    neighbours (leading-space markers, bytes split across tokens), so each step decodes
    a short window ending at the new token and emits only the text past the window's
    old end, holding back while the tail is an incomplete UTF-8 character (U+FFFD).
    """

    def __init__(self, tokenizer: BaseTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often ``""`` mid-character)."""
        if self.tokenizer.invisible(int(token_id)):
            return ""
        self.ids.append(int(token_id))
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read])
        after = dec(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        dec = self.tokenizer.decode
        before, after = dec(self.ids[self._prefix:self._read]), dec(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]
