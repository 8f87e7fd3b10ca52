"""Tokenizer: encode/decode with the checkpoint's own `tokenizer.json` (HF `tokenizers` library).

The files read are the ones an HF checkpoint ships: `tokenizer.json` (required), and when present
`tokenizer_config.json` (special tokens, chat template), `special_tokens_map.json`,
`generation_config.json` (the eos ids that end generation) and `chat_template.jinja`.

tokenizer.json is used as-is, which is what transformers does for a checkpoint directory (its
`AutoTokenizer` loads it through `TokenizersBackend` when a Phi-3 `config.json` sits beside it).
Note: transformers 5 rebuilds the pipeline from the class name (`GPT2Tokenizer`, `LlamaTokenizer`)
when given a tokenizer-only directory, which changes Phi-4-mini's o200k pre-tokenization; we follow
the file the model was trained with.

Streaming: `StreamDecoder` turns ids into text pieces whose concatenation equals `decode(all ids)`,
holding back incomplete UTF-8 sequences, and runs of byte-fallback tokens until a non-byte token ends them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


# the tokenizer and generation files of an HF checkpoint, copied as they are on save
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
              "vocab.json", "merges.txt")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what tokenizers' ByteFallback decoder reads as one byte


class TokenizerError(ValueError):
    """Tokenizer files that cannot be used; the message names the file."""


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _token_str(value) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the checkpoint says about it: special tokens, chat template, eos ids.

    `Tokenizer(directory)` reads an HF checkpoint's files; `Tokenizer.from_parts` takes them already
    parsed (a GGUF file carries the same facts in its metadata, see gguf_io.py).
    """

    def __init__(self, directory: str | Path):
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{d} has no tokenizer.json (phikit reads the fast-tokenizer file only; "
                                 "save one with transformers' tokenizer.save_pretrained)")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a plain Exception with the parse error
            raise TokenizerError(f"{path} could not be parsed: {e}") from None
        config = _read_json(d / "tokenizer_config.json")
        for key, value in _read_json(d / "special_tokens_map.json").items():
            config.setdefault(key, value)
        if isinstance(config.get("chat_template"), list):  # [{"name": "default", "template": ...}, ...]
            config["chat_template"] = next(
                (t["template"] for t in config["chat_template"] if t.get("name") == "default"), None)
        if (d / "chat_template.jinja").exists():  # newer transformers save the template as its own file
            config["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        gen_eos = _read_json(d / "generation_config.json").get("eos_token_id")
        self._setup(backend, config, [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else gen_eos)
        self.source_dir = d

    @classmethod
    def from_parts(cls, backend: _HFTokenizer, config: dict, generation_eos_ids: list[int] = ()) -> "Tokenizer":
        """From a built backend and a tokenizer_config-style dict (bos_token, eos_token, chat_template, ...)."""
        tok = cls.__new__(cls)
        tok._setup(backend, dict(config), generation_eos_ids)
        return tok

    def _setup(self, backend: _HFTokenizer, config: dict, generation_eos_ids) -> None:
        self.backend, self.config = backend, config
        self.bos_token, self.eos_token = _token_str(config.get("bos_token")), _token_str(config.get("eos_token"))
        self.unk_token, self.pad_token = _token_str(config.get("unk_token")), _token_str(config.get("pad_token"))
        self.bos_id = self.token_to_id(self.bos_token)
        self.eos_id = self.token_to_id(self.eos_token)
        self.chat_template: str | None = config.get("chat_template")
        self.generation_eos_ids = list(generation_eos_ids)
        self.source_dir: Path | None = None

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer files of an HF checkpoint: the original files when it came from one."""
        d = Path(directory)
        if self.source_dir is not None:
            for name in SIDE_FILES:
                if (self.source_dir / name).exists():
                    shutil.copy2(self.source_dir / name, d / name)
            return
        self.backend.save(str(d / "tokenizer.json"))
        keys = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "chat_template")
        config = {k: self.config[k] for k in keys if self.config.get(k) is not None}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.generation_eos_ids:
            (d / "generation_config.json").write_text(json.dumps({"eos_token_id": self.generation_eos_ids}) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for text. Special-token strings in text become their ids (as in chat templates)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stop_ids(self, template_markers: tuple[str, ...] = ()) -> set[int]:
        """Ids that end generation: generation_config eos ids, the tokenizer's eos and template end markers."""
        ids = set(self.generation_eos_ids)
        for tok in (self.eos_token, *template_markers):
            i = self.token_to_id(tok)
            if i is not None:
                ids.add(i)
        return ids

    def difference(self, other: "Tokenizer") -> str | None:
        """How other's ids mean other tokens than ours (vocabulary size, a token's id, bos/eos), or None."""
        if self.vocab_size != other.vocab_size:
            return f"{other.vocab_size} tokens against {self.vocab_size}"
        ours, theirs = self.backend.get_vocab(with_added_tokens=True), other.backend.get_vocab(with_added_tokens=True)
        if ours != theirs:
            token = min((t for t in ours if theirs.get(t) != ours[t]), key=ours.get, default=None)
            if token is None:  # the same tokens at the same ids, and some more of its own
                extra = min(set(theirs) - set(ours), key=theirs.get)
                return f"it has a token {extra!r} (id {theirs[extra]}) that this one has not"
            return (f"token {token!r} is id {theirs[token]} against {ours[token]}" if token in theirs else
                    f"it has no token {token!r} (id {ours[token]})")
        for name in ("bos_token", "eos_token"):
            if getattr(self, name) != getattr(other, name):
                return f"its {name} is {getattr(other, name)!r} against {getattr(self, name)!r}"
        return None

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: `step(id)` returns the new text (possibly ""); the pieces join to decode(ids).

    Each step decodes a short window of already-emitted ids plus the new ones and emits only what the
    window adds, so decoders that strip or merge at boundaries (SentencePiece's leading space, byte
    fallback) see enough context. Text ending in U+FFFD (an unfinished UTF-8 sequence) is held back.
    So is text after a byte-fallback token (<0xNN>): the ByteFallback decoder turns a whole run of
    byte tokens into U+FFFD per byte when the run is not valid UTF-8, so a later byte can undo a
    character the run already formed (<0x58> "X", then <0x58><0x82> "\ufffd\ufffd"). A special
    token that decoding skips does not end a run, so it is held back too.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0    # ids before this index are already emitted
        self.skipped = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items()
                        if t.special} if skip_special_tokens else set()

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.ids[-1] in self.skipped or _BYTE_TOKEN.fullmatch(self.tok.id_to_token(self.ids[-1]) or ""):
            return ""  # the run of byte tokens may continue
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(text) > len(before) and not text.endswith("\ufffd") and text.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete byte sequence at the very end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if text.startswith(before) else text
