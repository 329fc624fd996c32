"""Tokenizer of a Hugging Face checkpoint directory, on the `tokenizers` library (no transformers).

`Tokenizer.from_pretrained(dir)` reads tokenizer.json, tokenizer_config.json (special tokens,
chat template) and generation_config.json (extra EOS ids). It encodes and decodes like
transformers' fast tokenizer for the same files, and renders chat templates the way
transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks, `raise_exception`, `tojson`).

`IncrementalDetokenizer` turns generated ids into text one token at a time for streaming and
stop strings, on `tokenizers`' `DecodeStream`: byte-level tokens may end inside a multibyte
UTF-8 character, so text is held back until the character completes. It decodes a short
trailing window per token, not the whole sequence, and its pieces concatenate to exactly
`decode(all_ids)`.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]

# The special-token attributes of tokenizer_config.json that chat templates may read by name.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode yields for incomplete or invalid bytes


class ChatTemplateError(ValueError):
    """The checkpoint has no chat template, or its template rejected the messages."""


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or regenerate the file.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}.")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"expected a special token as a string or {{'content': ...}}, got {value!r}")


def _chat_template_of(directory: pathlib.Path, config: Mapping[str, Any]) -> str | None:
    # Newer transformers save the template beside the config; it wins over the config field.
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"chat_template in {directory / 'tokenizer_config.json'} should be a string or a list "
            f"of named templates with a 'default', got {type(template).__name__}."
        )
    return template


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text in some templates): renders
    its body unchanged, so such templates compile; we do not compute assistant masks."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Unlike jinja2's own tojson, no HTML escaping: templates emit JSON into plain text prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Encode, decode and chat-format text for one checkpoint. Build it with `from_pretrained`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
        name: str = "<in-memory tokenizer>",
    ) -> None:
        self._backend = backend
        self.name = name
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        eos_ids: list[int] = []
        eos = self.special_tokens.get("eos_token")
        if eos is not None:
            eos_ids.append(self._required_id(eos, "eos_token"))
        for i in extra_eos_token_ids:
            if int(i) not in eos_ids:
                eos_ids.append(int(i))
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id: int | None = self._required_id(pad, "pad_token") if pad is not None else None
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = self._required_id(bos, "bos_token") if bos is not None else None
        # Prepend bos ourselves only if asked and the backend's post-processor does not already.
        self._prepend_bos = bool(
            add_bos_token
            and self.bos_token_id is not None
            and self.bos_token_id not in backend.encode("", add_special_tokens=True).ids
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a local HF checkpoint directory (tokenizer.json required)."""
        directory = pathlib.Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            what = "directory" if directory.is_dir() else "path (it does not exist or is no directory)"
            raise FileNotFoundError(
                f"expected a tokenizer.json in the checkpoint {what} {str(directory)!r}, found none. "
                f"Pass a local Hugging Face checkpoint directory with a fast tokenizer "
                f"(tokenizer.json); resolve hub ids to a local snapshot first."
            )
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        _add_declared_tokens(backend, config.get("added_tokens_decoder") or {}, config_file)

        special = {key: _token_content(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        extra_eos: list[int] = []
        generation_file = directory / "generation_config.json"
        if generation_file.is_file():
            eos = _read_json(generation_file).get("eos_token_id")
            extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            backend,
            special_tokens=special,
            chat_template=_chat_template_of(directory, config),
            extra_eos_token_ids=extra_eos,
            add_bos_token=bool(config.get("add_bos_token", False)),
            name=str(directory),
        )

    # ---- ids <-> text

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of `token` (a vocabulary entry or added token), None if there is none."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_end|>") map to their
        ids; `add_special_tokens` adds what the tokenizer adds around a sequence (e.g. bos)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; for a batch, call it per text.")
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat
        template, as transformers' `apply_chat_template` does; ids if `tokenize`.

        Extra keyword arguments reach the template (e.g. tools=[...], enable_thinking=False).
        Keys whose value is None are dropped from messages, as transformers does.
        """
        if self.chat_template is None:
            raise ChatTemplateError(
                f"the tokenizer of {self.name} has no chat template (no 'chat_template' in "
                f"tokenizer_config.json and no chat_template.jinja). Pass token ids or plain text "
                f"prompts instead, or use a checkpoint with a chat template."
            )
        if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
            raise TypeError(
                f"apply_chat_template expects a list of message dicts like "
                f"[{{'role': 'user', 'content': 'hi'}}], got {messages!r:.200}."
            )
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context: dict[str, Any] = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        try:
            text = _compile_chat_template(self.chat_template).render(
                messages=chat, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(
                f"the chat template of {self.name} failed on these messages: {e}. Check the roles "
                f"and fields the template expects (e.g. alternating user/assistant turns)."
            ) from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _required_id(self, token: str, role: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{role} {token!r} of {self.name} is not in its vocabulary; tokenizer_config.json and "
                f"tokenizer.json disagree. Fix the {role} entry or regenerate the tokenizer files."
            )
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"


def _add_declared_tokens(
    backend: tokenizers.Tokenizer, declared: Mapping[str, Any], config_file: pathlib.Path
) -> None:
    """Add tokens that tokenizer_config.json declares but tokenizer.json lacks, at their ids."""
    for id_str, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
        content = _token_content(entry)
        if content is None or backend.token_to_id(content) is not None:
            continue
        special = bool(entry.get("special", True)) if isinstance(entry, Mapping) else True
        token = tokenizers.AddedToken(content, special=special, normalized=not special)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != int(id_str):
            raise ValueError(
                f"{config_file} declares added token {content!r} at id {id_str}, but tokenizer.json "
                f"would give it id {backend.token_to_id(content)}. The two files come from "
                f"different tokenizers; regenerate them together."
            )


class IncrementalDetokenizer:
    """Text of a growing id sequence, one token at a time, on `tokenizers`' `DecodeStream`.

    `push(id)` returns the text that the new token completes. A token that ends inside a
    multibyte UTF-8 character returns "" until a later token completes the character. The
    stream decodes a short trailing window per token (the tokens not yet emitted, with the
    previous piece's tokens as context), in Rust; only `flush` and `text` decode all ids, and
    only while a tail is held back.

    Invariant: "".join(pushes) + flush() == text == tokenizer.decode(all ids).

    Example:
        >>> detok = tokenizer.incremental_detokenizer()            # doctest: +SKIP
        >>> [detok.push(i) for i in tokenizer.encode("hi 😀!")]    # doctest: +SKIP
        ['h', 'i', ' ', '', '', '', '😀', '!']
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # None once the stream refused a window whose text does not extend the previous one
        # (not seen with byte-level BPE); full decodes take over for the rest of the sequence.
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._pieces: list[str] = []
        self._held = 0  # ids pushed since the last piece: an incomplete character, or no text
        self._finished = False

    @property
    def text(self) -> str:
        """All text so far, including a held-back tail (which may end in U+FFFD)."""
        return "".join(self._pieces) + self._tail()

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is incomplete)."""
        if self._finished:
            raise RuntimeError(
                "push() after flush(): this detokenizer's sequence has ended; start a new "
                "IncrementalDetokenizer for a new sequence."
            )
        token_id = int(token_id)
        self._ids.append(token_id)
        piece = None
        if self._stream is not None:
            try:
                piece = self._stream.step(self._tokenizer.backend, token_id)
            except Exception:  # noqa: BLE001  tokenizers raises a plain Exception ("invalid prefix"): see __init__
                self._stream = None
        if self._stream is None:
            piece = self._tail()
            piece = None if not piece or piece.endswith(_REPLACEMENT_CHAR) else piece
        if piece is None:
            self._held += 1
            return ""
        self._held = 0
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """End the sequence: return the held-back tail as it decodes now (possibly with U+FFFD)."""
        tail = self._tail()
        self._pieces.append(tail)
        self._finished = True
        return tail

    def _tail(self) -> str:
        """Text of the held-back ids: the full decode past what was emitted."""
        if not self._held and self._stream is not None:
            return ""
        full, done = self._tokenizer.decode(self._ids, self._skip_special), "".join(self._pieces)
        return full[len(done):] if full.startswith(done) else ""
