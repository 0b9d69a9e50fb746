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


# transformers' special-token attributes in its order, which is also the order in which it gives
# new ids to those the vocabulary lacks.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(cfg: Fields, key: str) -> str:
    """tokenizer_config.json writes special tokens as strings or as AddedToken objects."""
    if not cfg.has(key):
        return ""
    if isinstance(cfg.d[key], dict):
        return cfg.obj(key).str("content")
    return cfg.str(key)


def _legacy_files(files: CheckpointDir, cfg: Fields) -> tuple[Fields, dict]:
    """``special_tokens_map.json`` and ``added_tokens.json``, which transformers reads only for a
    tokenizer_config.json without ``added_tokens_decoder`` (older checkpoints); empty otherwise."""
    if cfg.has("added_tokens_decoder"):
        return Fields({}, "special_tokens_map.json"), {}
    found = [files.file(name, required=False) for name in ("special_tokens_map.json", "added_tokens.json")]
    mapped = Fields(read_json_object(found[0]) if found[0] else {}, str(found[0]))
    listed = Fields(read_json_object(found[1]) if found[1] else {}, str(found[1]))
    return mapped, {text: listed.int(text, lo=0) for text in listed.d}


def _special_tokens(cfg: Fields, mapped: Fields) -> dict[str, str]:
    """The special tokens a checkpoint names (only those it names: a template sees an absent one as
    undefined, as in transformers); special_tokens_map.json's win over tokenizer_config.json's."""
    out = {}
    for key in SPECIAL_KEYS:
        text = _token_text(mapped, key) or _token_text(cfg, key)
        if text:
            out[key] = text
    return out


def _added_token_entries(cfg: Fields, listed: dict[str, int], special_tokens: dict[str, str]) -> list[dict]:
    """``tokenizers.AddedToken`` arguments for every token the config files declare, in the order
    transformers adds those its tokenizer.json lacks: ``added_tokens_decoder`` by id (else
    ``added_tokens.json``'s by id), the special tokens, then ``additional_special_tokens``."""
    def token(text: str, special: bool, entry: Fields | None = None) -> dict:
        flags = {k: entry.bool(k, False) for k in ("lstrip", "rstrip", "single_word")} if entry else {}
        normalized = entry.bool("normalized", not special) if entry else not special
        return {"content": text, "special": special, "normalized": normalized, **flags}

    extra = []
    for key in ("additional_special_tokens", "extra_special_tokens"):  # transformers 4's name, 5's
        items = cfg.list(key) if cfg.has(key) and isinstance(cfg.d[key], list) else []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                item = Fields(item, cfg.source, f"{key}[{i}].").str("content")
            if not isinstance(item, str) or not item:
                raise cfg.fail(f"{key}[{i}]", "a token's text", item)
            extra.append(item)
    out = []
    decoder = cfg.obj("added_tokens_decoder")
    if decoder is not None:
        for key in decoder.d:
            if not key.isdigit():
                raise ModelError(f"{cfg.source}: added_tokens_decoder keys must be token ids, got {key!r}")
        for key in sorted(decoder.d, key=int):
            entry = decoder.obj(key)
            out.append(token(entry.str("content"), entry.bool("special", True), entry))
    specials = set(special_tokens.values()) | set(extra)
    out.extend(token(text, text in specials) for text in sorted(listed, key=lambda t: (listed[t], t)))
    out.extend(token(text, True) for text in special_tokens.values())
    out.extend(token(text, True) for text in extra)
    return out


def _add_missing_tokens(tok, entries: list[dict]) -> None:
    """Add to ``tok`` the declared tokens (``entries``) its tokenizer.json lacks, as transformers
    does: each the next id (the id a config file writes beside it is not used, by transformers
    either)."""
    from tokenizers import AddedToken

    for entry in entries:
        if tok.token_to_id(entry["content"]) is None:
            content = entry.pop("content")
            added = AddedToken(content, **entry)
            tok.add_special_tokens([added]) if entry["special"] else tok.add_tokens([added])


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
    # An added token that strips the whitespace beside it takes any run of it into its one id.
    if any(t.lstrip or t.rstrip for t in tok.get_added_tokens_decoder().values()):
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
        except BaseException as exc:  # tokenizers raises a bare Exception on bad JSON
            raise _library_error(exc, f"{path}: cannot load") from None
        # transformers encodes without the truncation or padding a saved tokenizer.json may carry
        # (it keeps the state it was last used with): so do we, or a prompt is cut or padded.
        self._tok.no_truncation()
        self._tok.no_padding()
        cfg_path = files.file("tokenizer_config.json", required=False)
        cfg = Fields(read_json_object(cfg_path) if cfg_path else {}, str(cfg_path or files.root / "tokenizer_config.json"))
        mapped, listed = _legacy_files(files, cfg)
        self.special_tokens = _special_tokens(cfg, mapped)
        _add_missing_tokens(self._tok, _added_token_entries(cfg, listed, self.special_tokens))
        self.bos_id = self._tok.token_to_id(self.special_tokens["bos_token"]) if "bos_token" in self.special_tokens else None
        eos = self._tok.token_to_id(self.special_tokens["eos_token"]) if "eos_token" in self.special_tokens else None
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
        try:
            ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except BaseException as exc:  # a model the file describes badly fails only here (no unk id...)
            raise _library_error(exc, f"{self.source}: cannot encode the text") from None
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        try:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        except BaseException as exc:  # the file's decoder (a Replace pattern...) fails only here
            raise _library_error(exc, f"{self.source}: cannot decode {len(ids)} token ids") from None


def _library_error(exc: BaseException, what: str) -> BaseException:
    """The ModelError for an error the tokenizers library raised while it worked, or ``exc`` itself
    for Ctrl-C and the like. A panic in its Rust code reaches Python as pyo3's PanicException, a
    BaseException that ``except Exception`` lets through (a regular expression of the file's that
    backtracks past Oniguruma's retry limit on the text panics so), and is a ModelError here too."""
    if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ModelError(f"{what}: {detail}")
    return exc


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
