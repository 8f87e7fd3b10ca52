"""Train a Phi-3-style BPE tokenizer with byte fallback (HF `tokenizers`), special tokens reserved.

The result has the layout of Phi-3 / Phi-3.5-mini's tokenizer.json (reference sheet §8.1):
  - ids 0, 1, 2: <unk>, <s>, </s>; ids 3..258: the byte pieces <0x00>..<0xFF>, so any character
    outside the learned vocabulary falls back to its UTF-8 bytes instead of <unk>;
  - then the learned BPE pieces, SentencePiece style (a space is "▁", prepended to the text);
  - then the Phi added tokens, in Phi-3's order: <|endoftext|>, <|assistant|>, <|placeholder1..4|>,
    <|system|>, <|end|>, <|placeholder5|>, <|placeholder6|>, <|user|>, with Phi-3.5's flags.
tokenizer_config.json names bos <s>, eos and pad <|endoftext|>, and carries the Phi-3.5 chat
template; generation_config.json lists Phi-3.5's stop ids (<|end|>, <|assistant|>, <|endoftext|>).
The directory loads with `phikit.tokenizer.Tokenizer`.

Training splits the text at each "▁" so no piece spans two words (as SentencePiece does); the saved
tokenizer has no pre-tokenizer, like Phi-3's, which gives the same pieces since no learned merge
crosses a word start. Rare characters beyond `limit_alphabet` are left to byte fallback.
Note: the vocabulary size is not padded (Phi-3 pads its embedding to 32064, not its tokenizer);
a model built for it needs vocab_size >= the tokenizer's size.
References: tokenizers `BpeTrainer`; the Phi-3.5-mini-instruct tokenizer.json (tests/fixtures/tokenizers).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .docs import DataError, count_documents, iter_documents, progress

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# Phi-3's added tokens in id order; chat markers strip the whitespace after them (rstrip), as Phi-3.5's do
ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
         "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
STOP_TOKENS = ["<|end|>", "<|assistant|>", "<|endoftext|>"]
SETTINGS_FILE = "phikit_tokenizer_train.json"


def _pipeline() -> dict:
    """The normalizer and decoder of Phi-3's tokenizer.json (SentencePiece conventions, byte fallback)."""
    return {
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "▁"}]},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    }


def train_bpe(texts, vocab_size: int = 32000, min_frequency: int = 2, limit_alphabet: int = 1000):
    """A `tokenizers.Tokenizer` trained on an iterable of texts; vocab_size counts the base vocabulary
    (specials, bytes, pieces), not the added Phi tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    n_pieces = vocab_size - len(SPECIALS) - len(BYTES)
    if n_pieces < 1:
        raise DataError(f"vocab_size must exceed {len(SPECIALS) + len(BYTES)} (specials and byte pieces)")
    layout = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "pre_tokenizer": None,
              "post_processor": None, "model": {"type": "BPE", "vocab": {}, "merges": []}, **_pipeline()}
    tok = Tokenizer.from_str(json.dumps(layout))
    tok.model = models.BPE(unk_token="<unk>")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # training only: words stay apart
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, min_frequency=min_frequency, limit_alphabet=limit_alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    trained = json.loads(tok.to_str())["model"]

    # rebuild with the SentencePiece layout: specials, bytes, then pieces in learned order
    vocab = SPECIALS + BYTES
    known = set(vocab)
    vocab += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in known]
    if len(vocab) <= len(SPECIALS) + len(BYTES):
        raise DataError("the training texts produced no vocabulary (is the corpus empty?)")
    added = [{"id": 0, "content": "<unk>", "rstrip": False}, {"id": 1, "content": "<s>", "rstrip": False},
             {"id": 2, "content": "</s>", "rstrip": True, "special": False}]
    added += [{"id": len(vocab) + i, "content": t, "rstrip": t != "<|endoftext|>"} for i, t in enumerate(ADDED)]
    added = [{"single_word": False, "lstrip": False, "normalized": False, "special": True, **a} for a in added]
    full = {**layout, "added_tokens": added,
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(vocab)}, "merges": trained["merges"]}}
    return Tokenizer.from_str(json.dumps(full))


def write_tokenizer_dir(backend, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json (Phi-3.5 chat template), generation_config.json."""
    from ..chat_format import BUILTIN_TEMPLATES

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "add_eos_token": False, "model_max_length": 4096,
              "chat_template": BUILTIN_TEMPLATES["phi-3.5"]}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    stop = [backend.token_to_id(t) for t in STOP_TOKENS]
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}, indent=2) + "\n")
    if extra is not None:
        (out_dir / SETTINGS_FILE).write_text(json.dumps(extra, indent=1) + "\n")
    return out_dir


def build_tokenizer(inputs: list, out_dir: str | Path, vocab_size: int = 32000, min_frequency: int = 2,
                    limit_alphabet: int = 1000, existing: str | Path | None = None,
                    overwrite: bool = False) -> tuple[Path, str]:
    """The tokenizer stage: train on the documents of `inputs`, or copy `existing` (a tokenizer directory
    or tokenizer.json). Writes to a temporary directory, then renames it to out_dir. Returns (dir, summary)."""
    from ..tokenizer import Tokenizer, TokenizerError

    out_dir = Path(out_dir)
    settings = {"inputs": [str(Path(i).resolve()) for i in inputs], "vocab_size": vocab_size,
                "min_frequency": min_frequency, "limit_alphabet": limit_alphabet,
                "existing": None if existing is None else str(Path(existing).resolve())}
    done = out_dir / SETTINGS_FILE
    if out_dir.exists() and not overwrite:
        if done.exists() and json.loads(done.read_text()) == settings:
            return out_dir, _summary(Tokenizer(out_dir), out_dir, settings) + " (already complete, nothing to do)"
        raise DataError(f"{out_dir} already exists and was not made with these settings; pass --overwrite to "
                        "replace it (it is kept until the new tokenizer is complete)")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if existing is not None:
        src = Path(existing)
        src_dir = src.parent if src.name == "tokenizer.json" else src
        try:
            tok = Tokenizer(src_dir)
        except TokenizerError as e:
            raise DataError(str(e)) from None
        if tok.eos_id is None:
            raise DataError(f"{src_dir}: the tokenizer names no eos token that exists in its vocabulary; "
                            "pack needs one to separate documents")
        tmp.mkdir(parents=True)
        tok.save(tmp)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    else:
        total = count_documents(inputs)
        if total == 0:
            raise DataError(f"{', '.join(map(str, inputs))}: no documents to train the tokenizer on")
        texts = (d["text"] for d in progress(iter_documents(inputs), total=total, desc="tokenizer"))
        write_tokenizer_dir(train_bpe(texts, vocab_size, min_frequency, limit_alphabet), tmp, settings)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():  # --overwrite: move the old directory aside until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir, _summary(Tokenizer(out_dir), out_dir, settings)


def _summary(tok, out_dir: Path, settings: dict) -> str:
    how = f"copied from {settings['existing']}" if settings["existing"] else "trained"
    return (f"tokenizer: {how}, vocabulary {tok.vocab_size} tokens (eos {tok.eos_token} = {tok.eos_id}) "
            f"-> {out_dir}")
