"""Preference data for DPO: TRL-format pairs -> a chosen and a rejected token sequence sharing one prompt.

Rows (jsonl or parquet) come in TRL's preference formats:

    explicit prompt   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                      (a string prompt is one user message, a string response one assistant message)
    implicit prompt   {"chosen": messages, "rejected": messages}: two whole conversations; the prompt is
                      the messages they share before they part (as trl.extract_prompt finds it)

Other keys (a category, a source) are ignored. Each side is rendered with the model's own chat template
and tokenized exactly as an SFT prompt-completion row is (data/sft.py): ids of the whole conversation,
targets on the response's assistant content and the end-of-turn token that closes it (`<|end|>`),
-100 elsewhere. The log-probability of a response, log π(y | x), is the sum over those targets, so it
counts the response's tokens only, end-of-turn included (TRL also counts what a template renders after
that token, e.g. a newline; phikit leaves it out, as `phikit sft` does).

What is refused, in one line naming the row: a row without chosen or rejected, an empty response, a
response that does not start with an assistant turn, an implicit-prompt pair whose conversations part
before an assistant turn (their prompts differ). What is counted and skipped: chosen identical to
rejected; a pair longer than max_len (dropped, or both sides cut to max_len with overflow="truncate";
a side left with no response token drops the pair). The counts are in the dataset's stats.

A batch of P pairs is 2P sequences in TRL's order (the P chosen, then the P rejected), padded or
packed into rows (data/sft.py's pack: attention confined to each sequence); `sequence` tells which
sequence each position belongs to, so that losses.sequence_logps sums each one's log-probabilities.

References: TRL `DPOTrainer` (`_prepare_dataset`, `DataCollatorForPreference`), `trl.extract_prompt`;
Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..tokenizer import Tokenizer
from ..train.losses import IGNORE_INDEX
from . import sft
from .sft import SFTDataError, _check_messages

PreferenceDataError = SFTDataError  # one error type for every fine-tuning data file: `file:line: what is wrong`


def _response(value, name: str) -> list[dict]:
    """A response as messages: a string is one assistant message; a list must start with an assistant turn."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    messages = _check_messages(value, name)
    if messages[0]["role"] != "assistant":
        raise SFTDataError(f"{name}[0] has role {messages[0]['role']!r}: a response starts with an assistant "
                           "message (give the conversation before it as 'prompt')")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise SFTDataError(f"{name}[{i}]: empty {name} response")
    return messages


def to_pair(row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) as message lists, from either of TRL's preference formats."""
    if row.get("chosen") is None or row.get("rejected") is None:
        raise SFTDataError(f"row needs 'chosen' and 'rejected' (and 'prompt' unless they are whole conversations); "
                           f"its keys: {sorted(row)}")
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, "prompt")
        return prompt, _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
        raise SFTDataError("a row without 'prompt' gives chosen and rejected as whole conversations (message lists)")
    chosen, rejected = _check_messages(row["chosen"], "chosen"), _check_messages(row["rejected"], "rejected")
    k = 0  # the first message where the two conversations part
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k < len(chosen) and k < len(rejected) and "assistant" not in (chosen[k]["role"], rejected[k]["role"]):
        raise SFTDataError(f"chosen and rejected differ at message {k} ({chosen[k]['role']}), before their "
                           "responses: their prompts differ")
    if k == 0:
        raise SFTDataError("chosen and rejected share no prompt messages")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if k == len(conversation):
            raise SFTDataError(f"empty {name} response: the conversation ends where the shared prompt does")
    return chosen[:k], _response(chosen[k:], "chosen"), _response(rejected[k:], "rejected")


@dataclass
class PreferenceDataset:
    """Tokenized pairs as (chosen ids, chosen targets, rejected ids, rejected targets) int32 tensors, and stats."""
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    stats: dict = field(default_factory=dict)  # rows, kept, identical, dropped_too_long, truncated, ...

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each pair (both sides): what batching by length and packing look at."""
        return [len(c) + len(r) for c, _, r, _ in self.pairs]


def _cut(ids: np.ndarray, targets: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) <= max_len:
        return ids, targets
    ids, targets = ids[:max_len], targets[:max_len].copy()
    targets[-1] = IGNORE_INDEX  # its next token was cut off
    return ids, targets


def load_preference_dataset(path: str | os.PathLike, tokenizer: Tokenizer, *, template: str | None = None,
                            max_len: int = 1024, overflow: str = "drop",
                            cache_dir: str | os.PathLike | None = None) -> PreferenceDataset:
    """Tokenize a jsonl/parquet preference file once; later calls with the same inputs read the cache
    (one safetensors file per key under cache_dir, default ~/.cache/phikit/sft, as for SFT data)."""
    if overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow must be 'drop' or 'truncate', not {overflow!r}")
    path = Path(path)
    sft._check_path(path)
    key = sft.cache_key(path, tokenizer, template, "assistant", max_len, overflow, kind="preference")
    cache = Path(cache_dir if cache_dir is not None else sft.DEFAULT_CACHE) / f"{key}.safetensors"
    cached = sft._read_cache(cache, key) if cache.exists() else None
    if cached is None:
        ids, targets, offsets, stats = _tokenize_file(path, tokenizer, template, max_len, overflow)
        sft._write_cache(cache, key, ids, targets, offsets, stats)
        cached = sft._dataset(ids, targets, offsets, stats)
    seqs = cached.examples  # chosen, rejected, chosen, rejected, ...
    return PreferenceDataset([(*seqs[i], *seqs[i + 1]) for i in range(0, len(seqs), 2)], cached.stats)


def _tokenize_file(path: Path, tokenizer: Tokenizer, template: str | None, max_len: int, overflow: str):
    """Flat ids and targets of the kept pairs' sequences (chosen, rejected, ...), their offsets, and the counts."""
    rows = sft._numbered_rows(path)
    enc = sft._Encoder(tokenizer, template)
    stats = dict(rows=len(rows), kept=0, identical=0, dropped_too_long=0, truncated=0, dropped_no_target=0,
                 tokens=0, sequences=0)
    seqs = []
    bar = tqdm(rows, desc=f"tokenizing {path.name}", unit="pair", file=sys.stderr,
               disable=True if len(rows) < 1000 else None)
    for where, row in bar:
        try:
            if row.get("chosen") is not None and row.get("chosen") == row.get("rejected"):
                stats["identical"] += 1  # in either form (an implicit pair has no response to tell apart)
                continue
            prompt, chosen, rejected = to_pair(row)
            if chosen == rejected:
                stats["identical"] += 1
                continue
            sides = [enc.encode({"prompt": prompt, "completion": side}) for side in (chosen, rejected)]
        except SFTDataError as e:
            raise SFTDataError(f"{where}: {e}") from None
        if max(len(ids) for ids, _ in sides) > max_len:
            if overflow == "drop":
                stats["dropped_too_long"] += 1
                continue
            sides = [_cut(ids, targets, max_len) for ids, targets in sides]
            stats["truncated"] += 1
        if any((targets == IGNORE_INDEX).all() for _, targets in sides):
            stats["dropped_no_target"] += 1  # the prompt alone fills max_len
            continue
        stats["kept"] += 1
        stats["tokens"] += sum(len(ids) for ids, _ in sides)
        seqs += [(ids.astype(np.int32), targets.astype(np.int32)) for ids, targets in sides]
    stats["sequences"] = len(seqs)
    lengths = np.array([len(ids) for ids, _ in seqs], dtype=np.int64)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    flat = [torch.from_numpy(np.concatenate([s[j] for s in seqs]) if seqs else np.zeros(0, np.int32)) for j in (0, 1)]
    return flat[0], flat[1], offsets, stats


def collate_pairs(pairs, pad_id: int, pack_len: int | None = None,
                  longrope_switch: int | None = None) -> dict[str, torch.Tensor]:
    """P pairs -> a batch of their 2P sequences (chosen 0..P-1, then rejected P..2P-1), padded, or packed
    into rows of pack_len positions (longrope_switch: as for data/sft.py's pack, a LongRoPE model's
    original_max_seq_len). Adds to data/sft.py's collate fields `sequence` (B, T): the sequence each
    position belongs to (-1 on padding), and `tokens` (2P,): each sequence's trained tokens."""
    seqs = [(c, ct) for c, ct, _, _ in pairs] + [(r, rt) for _, _, r, rt in pairs]
    if pack_len is not None:
        rows = sft.pack(seqs, pack_len, pad_id, longrope_switch=longrope_switch)
        batch = sft.collate(rows, pad_id)
        members = torch.full((len(rows), len(seqs) + 1), -1, dtype=torch.int64)  # row, segment -> sequence
        for b, row in enumerate(rows):
            members[b, :len(row.examples)] = torch.as_tensor(row.examples)
        batch["sequence"] = members.gather(1, batch["segments"].clamp(min=0)).masked_fill(batch["segments"] < 0, -1)
    else:
        batch = sft.collate(seqs, pad_id)
        batch["sequence"] = torch.arange(len(seqs))[:, None].expand_as(batch["ids"]).masked_fill(
            batch["segments"] < 0, -1)
    batch["tokens"] = torch.tensor([int((torch.as_tensor(t) != IGNORE_INDEX).sum()) for _, t in seqs])
    return batch
