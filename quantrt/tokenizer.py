"""One tokenizer for every model source: GGUF metadata or a Hugging Face directory.

Both sources end up as a `tokenizers.Tokenizer` whose post-processor already adds BOS/EOS the way
the model wants, so encoding, decoding, streaming and chat templates share one code path.

GGUF files carry no tokenizer.json, only llama.cpp's vocabulary keys.  Our reference for what those
keys mean is transformers' GGUF loader, so rather than re-deriving its rules (merges rebuilt from
scores, per-architecture quirks, pre-tokenizer regexes per `tokenizer.ggml.pre`) we hand the
in-memory metadata to its converter and then repeat the few steps its tokenizer class performs on
top (special tokens, BOS/EOS post-processing).  That keeps us token-for-token identical with it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

from quantrt.errors import ConfigError, FormatError, UnsupportedError

# Tokens that end a chat turn in common templates.  A model whose `eos` is <|endoftext|> still stops
# its replies with <|im_end|> (Qwen, SmolLM) or <|eot_id|> (Llama 3), so generation has to stop on
# any of them; only ones the vocabulary marks special count, so ordinary text can never match.
_TURN_END_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
    "<|end_of_text|>", "<|return|>", "<|call|>", "<|end_of_turn|>", "<|END_OF_TURN_TOKEN|>",
)
_GGUF_SPECIALS = (  # (name in templates, GGUF id key), in the order transformers registers them
    ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"),
)
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, backend: _Backend, *, special_tokens: dict[str, str | None],
                 chat_template: str | None, extra_eos_ids: tuple[int, ...] = (),
                 clean_up_spaces: bool = False) -> None:
        # Padding/truncation settings from a tokenizer.json would silently change encode() output.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template = chat_template or None
        self.bos_token_id = self._id_of(special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(special_tokens.get("eos_token"))
        self.pad_token_id = self._id_of(special_tokens.get("pad_token"))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # transformers skips its cleanup for BPE because it corrupts text; we mirror that choice.
        self._clean_up = clean_up_spaces and type(backend.model).__name__ != "BPE"
        self.eos_token_ids = self._collect_eos_ids(extra_eos_ids)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], where: str) -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise FormatError("GGUF metadata has no tokenizer.ggml.model", where=where)
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, (list, tuple)) or not tokens or not isinstance(tokens[0], str):
            raise FormatError("GGUF tokenizer.ggml.tokens is missing or not a string array", where=where)
        mapping = _gguf_mapping_module()
        if model not in mapping.GGUF_TOKENIZER_TYPES:
            raise ConfigError(f"unsupported GGUF tokenizer model {model!r}", where=where,
                              hint="supported: " + ", ".join(sorted(mapping.GGUF_TOKENIZER_TYPES)))

        renames = mapping.GGUF_TOKENIZER_MAPPING["tokenizer"]
        spec = {name: _plain_list(metadata[f"tokenizer.{key}"])
                for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        specials = {name: _token_at(tokens, metadata.get(f"tokenizer.ggml.{key}"), key, where)
                    for name, key in _GGUF_SPECIALS}

        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            # llama.cpp prepends BOS to a SentencePiece vocabulary unless the file says otherwise.
            add_bos = model == "llama"
        if model == "gemma4":
            # Its chat template writes <bos> itself; the reference tokenizer adds none.
            add_bos = False
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))

        architecture = str(metadata.get("general.architecture", ""))
        try:
            backend, _ = mapping.convert_gguf_tokenizer(architecture, spec)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise FormatError(f"cannot build the GGUF tokenizer: {exc}", where=where) from exc

        # The reference tokenizer class registers its named special tokens as whole-match specials
        # (this matters for e.g. SentencePiece <unk>, which the file marks UNKNOWN, not CONTROL).
        named = [AddedToken(t, special=True, normalized=False) for t in specials.values() if t]
        if named:
            backend.add_special_tokens(named)
        backend.post_processor = _bos_eos_processor(backend, specials, bool(add_bos), add_eos)
        template = metadata.get("tokenizer.chat_template")
        return cls(backend, special_tokens=specials,
                   chat_template=template if isinstance(template, str) else None)

    @classmethod
    def from_pretrained_dir(cls, path: str) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FormatError("tokenizer directory does not exist", where=path)
        if not any(os.path.isfile(os.path.join(path, name)) for name in _HF_FILES):
            raise FormatError("no tokenizer files (tokenizer.json / tokenizer_config.json) in directory",
                              where=path)
        from transformers import AutoTokenizer  # heavy import, only needed on this path

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"cannot load tokenizer: {str(exc).splitlines()[0]}", where=path) from exc
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise UnsupportedError("only fast (tokenizer.json-backed) tokenizers are supported", where=path)
        specials = {name: getattr(hf, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        specials = {k: (str(v) if v is not None else None) for k, v in specials.items()}
        template = hf.chat_template
        if isinstance(template, dict):  # several named templates; "default" is the chat one
            template = template.get("default")
        return cls(backend, special_tokens=specials, chat_template=template,
                   extra_eos_ids=_generation_eos_ids(path),
                   clean_up_spaces=bool(getattr(hf, "clean_up_tokenization_spaces", False)))

    # ----------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def stream(self, skip_special_tokens: bool = True) -> "DetokenizeStream":
        return DetokenizeStream(self, skip_special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    # ----------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **template_kwargs: Any) -> str | list[int]:
        if not self.chat_template:
            raise ConfigError("this model has no chat template",
                              hint="pass a plain prompt, or a tokenizer that carries a template")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ConfigError("chat messages must be a list of dicts with 'role' and 'content'")
        import jinja2

        context = {**_plain(template_kwargs), **self._special_tokens}
        try:
            text = _compile_template(self.chat_template).render(
                messages=_plain(list(messages)), tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"chat template failed: {exc}") from exc
        if tokenize:
            # The template already wrote any BOS it wants; adding another would double it.
            return self.encode(text, add_special_tokens=False)
        return text

    # ----------------------------------------------------------------------------- internals
    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _collect_eos_ids(self, extra: tuple[int, ...]) -> set[int]:
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        ids.update(i for i in extra if 0 <= i < self.vocab_size)
        special = {i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special}
        for name in _TURN_END_TOKENS:
            token_id = self._backend.token_to_id(name)
            if token_id in special:
                ids.add(token_id)
        return ids

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={sorted(self.eos_token_ids)}, chat_template={self.chat_template is not None})")


class DetokenizeStream:
    """Turns generated ids into text as they arrive.

    Decoding one token at a time is wrong for byte-level BPE and byte-fallback vocabularies (a
    character may span tokens) and for SentencePiece (a piece's leading space depends on what came
    before).  So we decode a small window twice -- with and without the newest tokens -- and emit
    the difference once it no longer ends in an incomplete character (U+FFFD).  The window starts
    at the previous emission point, which keeps the cost per token constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0   # window start: the tokens before it have been emitted
        self._done = 0    # ids[_start:_done] are emitted too, kept as decoding context

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._start:self._done])
        after = self._decode(self._ids[self._start:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        before = self._decode(self._ids[self._start:self._done])
        after = self._decode(self._ids[self._start:])
        self._start = self._done = len(self._ids)
        return after[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""


# --------------------------------------------------------------------------------- helpers
def _gguf_mapping_module():
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping
    except ImportError as exc:
        raise UnsupportedError("GGUF tokenizers need transformers >= 5 (integrations.gguf)") from exc
    return gguf_tokenizer_mapping


def _plain_list(value: Any) -> Any:
    # Callers may pass numpy arrays from a GGUF reader; the converter expects Python lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _token_at(tokens: list[str], token_id: Any, key: str, where: str) -> str | None:
    if token_id is None:
        return None
    if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        raise FormatError(f"tokenizer.ggml.{key}={token_id!r} is outside the vocabulary of {len(tokens)}",
                          where=where)
    return tokens[token_id]


def _bos_eos_processor(backend: _Backend, specials: dict[str, str | None], add_bos: bool,
                       add_eos: bool) -> processors.TemplateProcessing:
    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    pieces = []
    if add_bos:
        pieces.append((bos, backend.token_to_id(bos)))
    if add_eos:
        pieces.append((eos, backend.token_to_id(eos)))

    def side(seq: str, type_id: int) -> str:
        parts = ([f"{bos}:{type_id}"] if add_bos else []) + [f"${seq}:{type_id}"]
        return " ".join(parts + ([f"{eos}:{type_id}"] if add_eos else []))

    return processors.TemplateProcessing(single=side("A", 0), pair=f"{side('A', 0)} {side('B', 1)}",
                                         special_tokens=pieces)


def _generation_eos_ids(path: str) -> tuple[int, ...]:
    # Instruct models often list their end-of-turn ids only in generation_config.json / config.json.
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, int))
    return ()


def _clean_up(text: str) -> str:
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def _plain(value: Any) -> Any:
    # Templates are untrusted code: let them see only plain JSON-like data, never caller objects
    # whose methods the sandbox does not know to be dangerous.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy / torch scalars
        return _plain(value.item())
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # Training templates wrap assistant text in {% generation %} to mark it for loss masks;
        # for inference the block just renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes quotes and <>, which would change what the model sees.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template does not parse: {exc}") from exc
