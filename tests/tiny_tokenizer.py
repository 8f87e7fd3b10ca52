"""Tiny tokenizers shaped like the official Phi ones, for template and streaming tests.

`fixtures/tokenizers/<name>.json` holds, per checkpoint, verbatim copies of the official
tokenizer_config.json (chat template, special tokens), special_tokens_map.json,
generation_config.json and the non-vocabulary part of tokenizer.json (added tokens with their
lstrip/rstrip flags, normalizer, pre-tokenizer, decoder); each file lists its sources and what is
unconfirmed. `build()` trains a small vocabulary with the same pipeline and writes a checkpoint-style
tokenizer directory. Token ids are remapped to the small vocabulary; strings are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "You are a helpful assistant. Answer the question briefly and clearly, in plain English.",
    "I'M HAPPY you're here: 1234567 apples, 42 pears and 3.14159 pies; don't forget the tea!",
    "Hello, world!\n\nNew lines,\ttabs and  double  spaces matter. Café naïve façade — ünïcödé ✓.",
    "def add(a, b):\n    return a + b  # code is text too\n",
] * 4


def build(name: str, out_dir: Path, vocab_size: int = 300) -> Path:
    spec = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    header = spec["tokenizer_json_header"]
    byte_fallback = header["model"].get("byte_fallback", False)

    # 1. train a small BPE vocabulary with the same normalizer / pre-tokenizer as the real file
    pipeline = {**_EMPTY, "normalizer": header.get("normalizer"), "pre_tokenizer": header.get("pre_tokenizer")}
    tok = Tokenizer.from_str(json.dumps(pipeline))
    tok.model = models.BPE(unk_token=header["model"].get("unk_token"), byte_fallback=byte_fallback)
    if byte_fallback:  # SentencePiece layout: <unk> <s> </s>, then the 256 byte pieces
        specials = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        specials = []
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = list(specials)
    if byte_fallback:
        vocab += [f"<0x{b:02X}>" for b in range(256)]
    vocab += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in vocab]

    # 2. added tokens keep their order and flags; ids move right after the small vocabulary
    remap, added = {}, []
    for t in header["added_tokens"]:
        new_id = vocab.index(t["content"]) if t["content"] in vocab else len(vocab) + len(
            [a for a in added if a["content"] not in vocab])
        remap[t["id"]] = new_id
        added.append({**t, "id": new_id})
    model = {k: v for k, v in header["model"].items()}
    model.update(vocab={t: i for i, t in enumerate(vocab)}, merges=trained["merges"])
    full = {k: v for k, v in header.items() if not k.startswith("_")}
    full.update(added_tokens=added, model=model)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(full, ensure_ascii=False, indent=1), encoding="utf-8")
    cfg = dict(spec["tokenizer_config"])
    if "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {str(remap.get(int(i), int(i))): v for i, v in cfg["added_tokens_decoder"].items()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    if spec.get("special_tokens_map"):
        (out_dir / "special_tokens_map.json").write_text(json.dumps(spec["special_tokens_map"], indent=2))
    if spec.get("generation_config"):
        gen = dict(spec["generation_config"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = gen.get(key)
            gen[key] = [remap.get(i, i) for i in v] if isinstance(v, list) else remap.get(v, v)
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    # a config.json beside the tokenizer makes transformers load tokenizer.json as-is, as for a real checkpoint
    if not (out_dir / "config.json").exists():
        (out_dir / "config.json").write_text(json.dumps({"model_type": "phi3", "vocab_size": len(vocab) + len(added)}))
    return out_dir


_EMPTY = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
          "pre_tokenizer": None, "post_processor": None, "decoder": None,
          "model": {"type": "BPE", "vocab": {}, "merges": []}}
