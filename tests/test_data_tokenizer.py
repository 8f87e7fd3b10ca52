"""phikit data tokenizer: a Phi-3-layout BPE with byte fallback, loadable by phikit.tokenizer.Tokenizer."""

import json
from pathlib import Path

import pytest

from phikit.chat_format import encode_chat
from phikit.data.docs import DataError
from phikit.data.ingest import ingest
from phikit.data.tokenizer_train import ADDED, build_tokenizer
from phikit.tokenizer import Tokenizer

CORPUS = Path(__file__).parent / "fixtures" / "corpus"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    ingest([CORPUS / "web", CORPUS / "textbook", CORPUS / "notes"], d / "docs.jsonl")
    out, summary = build_tokenizer([d / "docs.jsonl"], d / "tok", vocab_size=1000)
    return d, out, summary


def test_layout_and_special_tokens(trained):
    _, out, summary = trained
    tok = Tokenizer(out)
    # ids as in Phi-3 (reference sheet §8.1): <unk> <s> </s>, 256 byte pieces, pieces, then the added tokens
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>")] == [0, 1, 2, 3, 13, 258]
    assert [tok.token_to_id(t) for t in ADDED] == list(range(1000, 1011))  # <|endoftext|> = 1000 ... <|user|> = 1010
    assert tok.vocab_size == 1011 and tok.eos_token == "<|endoftext|>" and tok.eos_id == 1000 and tok.bos_id == 1
    assert tok.stop_ids() == {1007, 1001, 1000}  # <|end|>, <|assistant|>, <|endoftext|> (generation_config.json)
    assert summary == f"tokenizer: trained, vocabulary 1011 tokens (eos <|endoftext|> = 1000) -> {out}"


def test_roundtrip_and_byte_fallback(trained):
    tok = Tokenizer(trained[1])
    for text in ["Photosynthesis is the process by which green plants use light energy.",
                 "  leading spaces,\ttabs and\n\nnewlines", "def f(x):\n    return x ** 2  # code",
                 "ünïcödé ✓ 日本語 🙂 — rare characters fall back to bytes"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # SentencePiece style: "▁" (the prepended space) then the three UTF-8 bytes of 日 as byte pieces
    assert tok.encode("日") == [tok.token_to_id("▁")] + [tok.token_to_id(f"<0x{b:02X}>") for b in "日".encode()]
    assert tok.token_to_id("<unk>") not in tok.encode("日本語 🙂")
    assert len(tok.encode("photosynthesis")) <= 4  # a frequent corpus word is a few pieces, not 14 letters


def test_chat_template_and_special_tokens_in_text(trained):
    tok = Tokenizer(trained[1])
    ids = encode_chat([{"role": "user", "content": "What is a prime number?"}], tok)
    assert ids[0] == tok.token_to_id("<|user|>") and ids[-1] == tok.token_to_id("<|assistant|>")
    assert tok.token_to_id("<|end|>") in ids


def test_noop_existing_and_errors(trained, tmp_path):
    d, out, _ = trained
    before = (out / "tokenizer.json").stat().st_mtime_ns
    again, summary = build_tokenizer([d / "docs.jsonl"], out, vocab_size=1000)
    assert "already complete" in summary and (out / "tokenizer.json").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="--overwrite"):
        build_tokenizer([d / "docs.jsonl"], out, vocab_size=500)
    copy, summary = build_tokenizer([], tmp_path / "copy", existing=out / "tokenizer.json")
    assert "copied" in summary and Tokenizer(copy).encode("hello there") == Tokenizer(out).encode("hello there")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no documents"):
        build_tokenizer([tmp_path / "empty.jsonl"], tmp_path / "t2")
    with pytest.raises(DataError, match="vocab_size must exceed"):
        build_tokenizer([d / "docs.jsonl"], tmp_path / "t3", vocab_size=100)
    assert not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()
    settings = json.loads((out / "phikit_tokenizer_train.json").read_text())
    assert settings["vocab_size"] == 1000
