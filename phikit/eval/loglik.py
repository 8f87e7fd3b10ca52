"""Log-likelihood of continuations given contexts: what multiple-choice evaluation is made of.

A request is a (context ids, continuation ids) pair; its answer is (sum of log p(continuation token |
everything before it), whether greedy decoding would have produced the continuation), as
lm-eval-harness defines it. The options of one question share their context, so:

- requests are grouped by context; a context is run through the model once per group;
- a group whose continuations are one token each (MMLU's " A", " B", ...) needs nothing more: the
  logits at the context's last position score every option (and the output matmul runs there only);
- longer continuations run after their context in a KV cache: the context's keys and values are
  computed once, copied to one cache row per option, and each option's tokens attend to them;
- groups are sorted by length and batched under a token budget, so padding stays small.

A pair longer than the model's context is cut from the left, as lm-eval does (the context loses its
first tokens; the continuation is kept whole).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..model import Phi3


@dataclass
class _Group:
    context: tuple[int, ...]
    long_rope: bool
    members: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (request index, continuation)

    @property
    def rows(self) -> int:  # cache rows it needs when some continuation has more than one token
        return len(self.members)

    @property
    def tail(self) -> int:  # the longest continuation minus its last token: what runs after the context
        return max(len(c) for _, c in self.members) - 1


def _group(model: Phi3, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    for i, (ctx, cont) in enumerate(requests):
        cont = tuple(cont)
        if not cont:
            raise ValueError(f"request {i}: an empty continuation has no likelihood to score")
        if not ctx:
            raise ValueError(f"request {i}: an empty context (give a prefix token, e.g. BOS, as lm-eval does)")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: a continuation of {len(cont)} tokens does not fit a context of {max_len}")
        whole = (tuple(ctx) + cont)[-(max_len + 1):]  # lm-eval: (ctx + cont)[-(max_len+1):][:-1] is the input
        ctx = whole[:len(whole) - len(cont)]
        long_rope = bool(model.rope.use_long(torch.tensor([[len(whole) - 2]]))[0])  # the input is len(whole) - 1
        key = (ctx, long_rope)
        groups.setdefault(key, _Group(ctx, long_rope)).members.append((i, cont))
    return list(groups.values())


def _batches(groups: list[_Group], batch_tokens: int, max_rows: int):
    """Groups sorted by length (longest first), cut into batches of at most batch_tokens padded tokens."""
    groups = sorted(groups, key=lambda g: (-(len(g.context) + g.tail), g.context))
    batch: list[_Group] = []
    for g in groups:
        T = len(batch[0].context) + batch[0].tail if batch else len(g.context) + g.tail  # the first is the longest
        if batch and ((len(batch) + 1) * T > batch_tokens or len(batch) >= max_rows):
            yield batch
            batch = []
        batch.append(g)
    if batch:
        yield batch


@torch.no_grad()
def loglikelihoods(model: Phi3, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int | None = None,
                   batch_tokens: int = 4096, max_rows: int = 64,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids) request, in order.

    max_len: the model's context (default cfg.max_seq_len). batch_tokens bounds a batch's padded size
    (rows x longest row); progress(n) is called with the number of requests each batch finished.
    """
    max_len = max_len or model.cfg.max_seq_len
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = model.norm.weight.device
    try:
        for batch in _batches(_group(model, requests, max_len), batch_tokens, max_rows):
            for i, logp in _score_batch(model, batch, device).items():
                target = torch.tensor(requests[i][1], device=device)[-len(logp):]
                results[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
            if progress is not None:
                progress(sum(len(g.members) for g in batch))
    finally:
        model.remove_cache()
    return results  # type: ignore[return-value]


def _score_batch(model: Phi3, batch: list[_Group], device) -> dict[int, torch.Tensor]:
    """Log-probabilities (len(continuation), V) predicting each continuation token, per request index.

    Phase 1 runs the contexts (right-padded: attention is causal, so no real token sees the padding) and
    keeps the last context position's logits. If some continuation is longer than one token, the contexts
    run into a KV cache, each in the first of its group's rows; phase 2 copies them to the group's other
    rows and runs every option's tokens (but the last) after its context, at positions len(context)...
    """
    G, T = len(batch), max(len(g.context) for g in batch)
    ids = torch.zeros(G, T, dtype=torch.long, device=device)
    last = torch.zeros(G, T, dtype=torch.bool, device=device)
    for b, g in enumerate(batch):
        ids[b, :len(g.context)] = torch.tensor(g.context, device=device)
        last[b, len(g.context) - 1] = True
    long_rope = torch.tensor([g.long_rope for g in batch], device=device)
    tail = max(g.tail for g in batch)
    if tail == 0:
        model.remove_cache()
        first = model(ids, rope_long=long_rope, select=last).float().log_softmax(-1)  # (G, V)
        return {i: first[b, None] for b, g in enumerate(batch) for i, _ in g.members}

    starts = [0]
    for g in batch[:-1]:
        starts.append(starts[-1] + len(g.members))  # each group's first cache row
    model.setup_cache(starts[-1] + len(batch[-1].members), T + tail)
    first = model(ids, torch.arange(T, device=device).expand(G, T), rows=torch.tensor(starts, device=device),
                  rope_long=long_rope, select=last).float().log_softmax(-1)
    src = [s for g, s in zip(batch, starts) for _ in g.members[1:]]
    dst = [s + k for g, s in zip(batch, starts) for k in range(1, len(g.members))]
    if src:
        src_t, dst_t = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        for block in model.layers:
            cache = block.self_attn.kv_cache
            for t in (cache.k, cache.v, cache.k_scale, cache.v_scale):
                if t is not None:
                    t[dst_t] = t[src_t]
        model.cache_rope_long[dst_t] = model.cache_rope_long[src_t]
    # every option of every group: its tokens but the last, right-padded to `tail`
    n_rows = starts[-1] + len(batch[-1].members)
    ids2 = torch.zeros(n_rows, tail, dtype=torch.long, device=device)
    pos2 = torch.zeros(n_rows, tail, dtype=torch.long, device=device)
    long2 = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for g, s in zip(batch, starts):
        for k, (_, cont) in enumerate(g.members):
            ids2[s + k, :len(cont) - 1] = torch.tensor(cont[:-1], device=device)
            pos2[s + k] = torch.arange(len(g.context), len(g.context) + tail, device=device)
            long2[s + k] = g.long_rope
    rest = model(ids2, pos2, rows=slice(0, n_rows), rope_long=long2).float().log_softmax(-1)  # (R, tail, V)
    out = {}
    for b, (g, s) in enumerate(zip(batch, starts)):
        for k, (i, cont) in enumerate(g.members):
            out[i] = torch.cat([first[b, None], rest[s + k, :len(cont) - 1]])
    return out
