"""Mixture sampling over named shard directories, deterministic in (seed, step) and sharded across ranks.

A source is a directory of packed token shards (phikit/data/shards.py, written by `phikit data pack`).
Validation uses the source's `val/` shard directory when it has one (what `phikit data pack --val-fraction`
writes), else the last `val_tokens` tokens of its last shard, held out. Training windows
of seq_len + 1 tokens start at any offset of the training shards (windows cross document boundaries, which the
end-of-text ids mark, as in GPT-2 and nanoGPT packing).

Sampling is stateless: the global batch of optimizer step `step` is drawn from a NumPy generator seeded
with (seed, step). Each sequence picks its source with the phase's mixture weights, then a uniform start
offset within that source. Rank r of W takes rows [r B/W, (r+1) B/W) of the same global batch, so the
batch does not depend on the number of processes, and resuming needs only the step counter: the data
position is the step. Sampling is with replacement; a token budget larger than a source simply sees
its windows more than once (in expectation, budget * weight / source tokens times).

References: nanoGPT `train.py::get_batch` (random windows from a memmap); llm.c `dataloader.h`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data.shards import MANIFEST, ShardError, load_tokens, read_manifest


class MixtureData:
    """Named sources -> training batches (by step and rank) and per-source validation batches."""

    def __init__(self, sources: dict[str, str | os.PathLike], seq_len: int, val_tokens: int = 0, seed: int = 0):
        self.names = list(sources)
        self.seq_len, self.val_tokens, self.seed = seq_len, val_tokens, seed
        self.manifests, self.train, self.val, self.windows = {}, {}, {}, {}
        for name, directory in sources.items():
            self.manifests[name] = read_manifest(directory)
            shards = [s for s in load_tokens(directory) if len(s)]
            if (Path(directory) / "val" / MANIFEST).exists():  # `phikit data pack --val-fraction` puts them here
                self.val[name] = np.concatenate(load_tokens(Path(directory) / "val"))
            elif val_tokens:
                if not shards or len(shards[-1]) < val_tokens + seq_len + 1:
                    raise ShardError(f"source {name!r} ({directory}) has no val/ directory, and its last shard is too "
                                     f"small to hold out val_tokens: it needs val_tokens + seq_len + 1 = "
                                     f"{val_tokens + seq_len + 1} tokens, it has {len(shards[-1]) if shards else 0}")
                self.val[name] = shards[-1][len(shards[-1]) - val_tokens:]
                shards[-1] = shards[-1][:len(shards[-1]) - val_tokens]
            self.train[name] = shards
            # training window starts per shard; their cumulative sum maps one index to (shard, offset)
            self.windows[name] = np.cumsum([max(0, len(s) - seq_len) for s in shards])
            if not len(shards) or self.windows[name][-1] == 0:
                raise ShardError(f"source {name!r} ({directory}) has no shard of seq_len + 1 = {seq_len + 1} tokens")

    def vocab_size(self) -> int:
        """The largest vocab_size any source's manifest declares."""
        return max(int(m["vocab_size"]) for m in self.manifests.values())

    def global_batch(self, step: int, mixture: dict[str, float], batch_size: int) -> list[tuple[str, int, int]]:
        """(source, shard, offset) of each sequence of the global batch of `step`: a pure function of its arguments."""
        names = list(mixture)
        weights = np.array([mixture[n] for n in names], dtype=np.float64)
        rng = np.random.default_rng([self.seed, step])
        picks = rng.choice(len(names), size=batch_size, p=weights / weights.sum())
        highs = np.array([self.windows[names[i]][-1] for i in picks])
        starts = rng.integers(0, highs)  # a window index within the chosen source
        out = []
        for i, start in zip(picks, starts):
            cum = self.windows[names[i]]
            shard = int(np.searchsorted(cum, start, side="right"))
            offset = int(start - (cum[shard - 1] if shard else 0))
            out.append((names[i], shard, offset))
        return out

    def batch(self, step: int, mixture: dict[str, float], batch_size: int, rank: int = 0, world: int = 1
              ) -> torch.Tensor:
        """This rank's rows of the global batch of `step`: (batch_size / world, seq_len + 1) token ids (int64)."""
        per_rank = batch_size // world
        rows = self.global_batch(step, mixture, batch_size)[rank * per_rank:(rank + 1) * per_rank]
        T1 = self.seq_len + 1
        return torch.from_numpy(np.stack([self.train[n][s][o:o + T1].astype(np.int64) for n, s, o in rows]))

    def val_batches(self, name: str, micro_batch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
        """This rank's validation micro-batches of source `name`: consecutive non-overlapping windows.

        Windows are dealt round-robin to ranks, the remainder dropped, so every rank runs the same number
        of forwards (FSDP needs all ranks in every forward)."""
        T1 = self.seq_len + 1
        n = len(self.val[name]) // T1 // world * world
        if n == 0:
            return []
        windows = np.asarray(self.val[name][:n * T1], dtype=np.int64).reshape(n, T1)[rank::world]
        return list(torch.from_numpy(windows).split(micro_batch))
