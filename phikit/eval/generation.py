"""Batched generation for evaluation: completions cut at the first stop string, as lm-eval cuts them.

A row stops at a stop id (its generation_config eos ids, or the chat template's end-of-turn token),
at max_new_tokens, or as soon as its text contains one of the stop strings; the text returned is what
comes before the first stop string, with special tokens left out. Prompts run in batches of similar
length (phikit.generate: one KV cache row each); greedy unless a Sampling says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..generate import Sampling, generate
from ..model import Phi3
from ..tokenizer import Tokenizer


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """text before the first occurrence of each non-empty stop string, applied in order (lm-eval's rule)."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@torch.no_grad()
def generate_texts(model: Phi3, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_strings: Sequence[str] = (), stop_ids: Sequence[int] = (), sampling: Sampling | None = None,
                   batch_size: int = 8, max_len: int | None = None,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """The completion text of each prompt (token ids), in order.

    A prompt that leaves fewer than max_new_tokens positions in the model's context (max_len, default
    cfg.max_seq_len) loses its first tokens, as lm-eval's left truncation does.
    """
    max_len = max_len or model.cfg.max_seq_len
    if max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {max_len}")
    prompts = [list(p)[-(max_len - max_new_tokens):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    out: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, text in zip(idx, _generate_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens,
                                                stop_strings, stop_ids, sampling)):
            out[i] = text
        if progress is not None:
            progress(len(idx))
    return out  # type: ignore[return-value]


def _generate_batch(model, tokenizer, prompts, max_new_tokens, stop_strings, stop_ids, sampling) -> list[str]:
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stop_set = set(stop_ids)
    lookback = max((len(s) for s in stop_strings), default=0) + 16  # characters a new token can complete a stop in
    for step in generate(model, prompts, max_new_tokens, sampling or Sampling(temperature=0.0), stop_ids=stop_ids):
        for b, t in enumerate(step):
            if t is None or done[b]:
                continue
            if t in stop_set:
                done[b] = True
                continue
            tokens[b].append(t)
            if stop_strings:
                tail = tokenizer.decode(tokens[b][-lookback:], skip_special_tokens=True)
                done[b] = any(s and s in tail for s in stop_strings)
        if all(done):
            break
    return [cut_at_stops(tokenizer.decode(t, skip_special_tokens=True), stop_strings) for t in tokens]
