"""Pack: documents -> token ids, each document followed by the end-of-text id -> fixed-size shards + manifest.

The token stream (doc_1 eos doc_2 eos ...) is cut into shards of exactly `shard_tokens` tokens (the
last one shorter); a document may run across a shard boundary, as in llm.c. Shards use the format of
shards.py (32-byte header, uint32 tokens); `shards.read_manifest(OUT)` / `shards.load_tokens(OUT)`
read them back. The manifest adds "documents", "tokens", "source" (a name for this data source,
for mixing several), "split" and the settings that made it.

Validation split: with val_fraction > 0, each document goes to validation when the hash of its id
falls below val_fraction (deterministic, order-independent, about that fraction of documents), and
the validation shards are a second packed directory, OUT/val, with its own manifest; OUT's manifest
names it under "val". So `load_tokens(OUT)` is the training data and `load_tokens(OUT / "val")` the
validation data.

Resuming and atomicity: the work happens in OUT.partial/. After each batch that completes a shard,
pack records in OUT.partial/pack.state.json how many documents it consumed, the shards written and
the tokens carried over to the next shard (kept in a small shard-format file), so a rerun with the
same settings continues from there. At the end the directory is renamed to OUT; an older OUT (with
--overwrite) is moved aside first and removed only once the new one is in place. A complete OUT
with the same settings makes pack a no-op.
References: llm.c `dev/data/data_common.py::write_datafile`; nanoGPT `data/openwebtext/prepare.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .docs import DataError, count_documents, iter_documents, progress
from .shards import read_manifest, read_shard, write_manifest, write_shard

STATE = "pack.state.json"


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: its id's hash, as a number in [0, 1), is below."""
    return int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < val_fraction


class _Split:
    """One output directory being filled: a token buffer cut into shards of `shard_tokens`."""

    def __init__(self, directory: Path, shard_tokens: int, state: dict | None = None):
        self.dir, self.shard_tokens = directory, shard_tokens
        self.dir.mkdir(parents=True, exist_ok=True)
        state = state or {"shards": [], "documents": 0, "tokens": 0}
        self.shards, self.documents, self.tokens = state["shards"], state["documents"], state["tokens"]
        carry = self.dir / ".carry.bin"
        self.buffer = [np.array(read_shard(carry))] if state.get("carry") and carry.exists() else []
        self.buffered = sum(len(b) for b in self.buffer)

    def add(self, ids: list[int]) -> bool:
        """Append one document's ids (eos included); returns True when a shard was written."""
        self.buffer.append(np.asarray(ids, dtype=np.uint32))
        self.buffered += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        wrote = False
        while self.buffered >= self.shard_tokens:
            tokens = np.concatenate(self.buffer)
            self._write(tokens[:self.shard_tokens])
            self.buffer, self.buffered = [tokens[self.shard_tokens:]], len(tokens) - self.shard_tokens
            wrote = True
        return wrote

    def _write(self, tokens: np.ndarray) -> None:
        name = f"shard-{len(self.shards):05d}.bin"
        write_shard(self.dir / name, tokens)
        self.shards.append({"file": name, "tokens": int(len(tokens))})

    def state(self) -> dict:
        """Checkpoint: the carried-over tokens go to .carry.bin, the counts into the returned dict."""
        write_shard(self.dir / ".carry.bin", np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.uint32))
        return {"shards": self.shards, "documents": self.documents, "tokens": self.tokens, "carry": True}

    def close(self, manifest: dict) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        (self.dir / ".carry.bin").unlink(missing_ok=True)
        write_manifest(self.dir, {**manifest, "documents": self.documents, "tokens": self.tokens,
                                  "shards": self.shards})


def pack(inputs: list, tokenizer_dir: str | Path, out: str | Path, shard_tokens: int = 2**24,
         val_fraction: float = 0.0, source: str | None = None, eos_token: str | None = None,
         batch_size: int = 256, overwrite: bool = False) -> tuple[Path, str]:
    """Run the pack stage; returns (output directory, one-line summary)."""
    from ..tokenizer import Tokenizer, TokenizerError

    out = Path(out)
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    try:
        tok = Tokenizer(tokenizer_dir)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    eos_token = eos_token or tok.eos_token
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise DataError(f"{tokenizer_dir}: no end-of-text token {eos_token!r} in the vocabulary; pass --eos-token")
    total = count_documents(inputs)
    if total == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents to pack (empty corpus)")
    settings = {"inputs": [str(Path(i).resolve()) for i in inputs], "tokenizer": str(Path(tokenizer_dir).resolve()),
                "tokenizer_sha1": hashlib.sha1((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest(),
                "shard_tokens": shard_tokens, "val_fraction": val_fraction, "eos_id": eos_id}
    source = source or (Path(inputs[0]).stem if len(inputs) == 1 else out.name)
    if (out / "manifest.json").exists() and not overwrite:
        manifest = read_manifest(out)
        if manifest.get("settings") == settings:
            return out, _summary(out, manifest, read_manifest(out / "val") if "val" in manifest else None) + \
                " (already complete, nothing to do)"
        raise DataError(f"{out} already holds packed data made with other settings; pass --overwrite to replace "
                        "it (it is kept until the new data is complete)")
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a packed directory; choose another output")

    work = out.with_name(out.name + ".partial")
    state_path = work / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("settings") != settings:  # nothing to resume: start afresh
        shutil.rmtree(work, ignore_errors=True)
        state = {}
    train = _Split(work, shard_tokens, state.get("train"))
    val = _Split(work / "val", shard_tokens, state.get("val")) if val_fraction > 0 else None
    skip, consumed, empty = state.get("consumed", 0), state.get("consumed", 0), state.get("empty", 0)

    def checkpoint():
        new = {"settings": settings, "consumed": consumed, "empty": empty, "train": train.state(),
               "val": val.state() if val else None}
        tmp = state_path.with_name(STATE + ".tmp")
        tmp.write_text(json.dumps(new) + "\n")
        os.replace(tmp, state_path)

    batch: list[dict] = []

    def flush():
        nonlocal consumed, empty
        encodings = tok.backend.encode_batch([d["text"] for d in batch], add_special_tokens=False)
        wrote = False
        for doc, enc in zip(batch, encodings):
            consumed += 1
            if not enc.ids:
                empty += 1
                continue
            split = val if val and is_val(doc.get("id") or doc["text"], val_fraction) else train
            wrote |= split.add(enc.ids + [eos_id])
        batch.clear()
        if wrote:
            checkpoint()

    # an error or interrupt leaves the last checkpoint in place: a rerun continues from it
    for i, doc in enumerate(progress(iter_documents(inputs), total=total, desc="pack")):
        if i >= skip:
            batch.append(doc)
            if len(batch) == batch_size:
                flush()
    flush()
    if train.documents == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: every document tokenized to nothing; nothing to pack")
    common = {"vocab_size": tok.vocab_size, "eos_id": eos_id, "source": source, "tokenizer": settings["tokenizer"],
              "shard_tokens": shard_tokens, "settings": settings}
    if val:
        val.close({**common, "split": "val"})
    train.close({**common, "split": "train", **({"val": "val"} if val else {}), "empty_documents": empty})
    state_path.unlink()
    old = out.with_name(out.name + ".old")
    if out.exists():  # an older output (--overwrite, or an empty dir) is moved aside until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
    return out, _summary(out, read_manifest(out), read_manifest(out / "val") if val else None)


def _summary(out: Path, train: dict, val: dict | None) -> str:
    line = (f"pack: {train['documents'] + (val['documents'] if val else 0)} documents in; "
            f"train {train['documents']} documents, {train['tokens']} tokens in {len(train['shards'])} shards")
    if val:
        line += f"; val {val['documents']} documents, {val['tokens']} tokens in {len(val['shards'])} shards"
    empty = train.get("empty_documents", 0)
    return line + f"; removed: {f'empty {empty}' if empty else 'none'} (eos {train['eos_id']}, vocab " \
                  f"{train['vocab_size']}) -> {out}"
