"""Tokenizers: loading (GGUF vocab/merges, Hugging Face ``tokenizer.json``), saving, chat templates.

A ``Tokenizer`` wraps a Hugging Face ``tokenizers.Tokenizer`` with what generation needs: the
special tokens that end a turn and the chat template (a Jinja template, as on the Hub).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from afmkit.errors import CorruptFileError, UserError

# ChatML, the template SmolLM2 ships and the default for models that have none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, str]


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        stop_tokens: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        # Tokens that end generation: the EOS plus e.g. ChatML's end-of-turn and end-of-text.
        self.stop_tokens = tuple(dict.fromkeys([t for t in (eos_token, *stop_tokens) if t]))
        self._template = None

    # -- encoding ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise UserError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def bos_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def stop_ids(self) -> list[int]:
        ids = (self.backend.token_to_id(t) for t in self.stop_tokens)
        return [i for i in ids if i is not None]

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        wants_bos = self.add_bos if add_bos is None else add_bos
        if wants_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation as the model's prompt text."""
        _check_messages(messages)
        if self._template is None:
            import jinja2.sandbox

            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise UserError(f"chat template: {message}")

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template or CHATML_TEMPLATE)
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "stop_tokens": list(self.stop_tokens),
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``), as saved by afmkit or the Hub."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer.json in {directory}; copy the model's tokenizer files there")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions on bad JSON
            raise CorruptFileError(f"cannot read {path}: {exc}; re-download or re-save the tokenizer") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as exc:
                raise CorruptFileError(f"cannot parse {config_path}: {exc}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # Hub format: a list of named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            add_bos=bool(config.get("add_bos_token", False)),
            stop_tokens=config.get("stop_tokens") or _default_stop_tokens(backend),
        )

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer stored in a GGUF file's ``tokenizer.ggml.*`` metadata."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UserError(
                f"GGUF tokenizer model {kind!r} is not supported (afmkit reads byte-level BPE, 'gpt2'); "
                "convert the model to a Hugging Face directory with tokenizer.json instead"
            )
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        token_types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        # Every digit its own token (the SmolLM2 / AFM rule), then GPT-2 byte-level splitting.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        backend.decoder = decoders.ByteLevel()
        # GGUF token types: 3 = control, 4 = user-defined; both must never be split by BPE.
        specials = [
            tokenizers.AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(token_types)
            if t in (3, 4)
        ]
        backend.add_special_tokens(specials)

        def special(key: str) -> str | None:
            index = fields.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        return cls(
            backend,
            chat_template=fields.get("tokenizer.chat_template"),
            bos_token=special("bos"),
            eos_token=special("eos"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            stop_tokens=_default_stop_tokens(backend),
        )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # Hub format: {"content": "<s>", ...}
        return value.get("content")
    return value


def _default_stop_tokens(backend: tokenizers.Tokenizer) -> list[str]:
    """Well-known end-of-turn tokens present in this vocabulary."""
    known = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>"]
    return [t for t in known if backend.token_to_id(t) is not None]


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise UserError("a chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise UserError(f"chat message {i} has unknown role {message['role']!r}; use system, user or assistant")


def load_tokenizer(name_or_path: str):
    """A tokenizer by model name (its tokenizer only, no weights) or from a directory/GGUF file."""
    from afmkit.weights import NAMED_WEIGHTS, known_models, named_base

    name_or_path = named_base(name_or_path)  # an adapted or compressed model: its base's tokenizer
    path = NAMED_WEIGHTS[name_or_path]() if name_or_path in NAMED_WEIGHTS else Path(name_or_path).expanduser()
    if path.is_dir():
        return Tokenizer.from_directory(path)
    if path.is_file() and path.suffix == ".gguf":
        from afmkit.interop.gguf import read_gguf

        return Tokenizer.from_gguf_fields(read_gguf(path)[1])
    raise UserError(
        f"--tokenizer {name_or_path!r} is neither a known model ({', '.join(known_models())}), "
        "a directory with tokenizer.json, nor a .gguf file"
    )
