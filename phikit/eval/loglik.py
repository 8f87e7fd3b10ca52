"""Log-likelihood of continuations given contexts: what multiple-choice evaluation is made of.

A request is a (context ids, continuation ids) pair; its answer is (sum of log p(continuation token |
everything before it), whether greedy decoding would have produced the continuation), as
lm-eval-harness defines it. The options of one question share their context, so:

- requests are grouped by context; a context is run through the model once per group;
- a group whose continuations are one token each (MMLU's " A", " B", ...) needs nothing more: the
  logits at the context's last position score every option (and the output matmul runs there only);
- longer continuations run after their context in a KV cache: the context's keys and values are
  computed once, copied to one cache row per option, and each option's tokens attend to them;
- contexts that start alike (the same k-shot examples before each question of an MMLU subject) share
  that start: its keys and values are computed once and copied into each row before the rest runs;
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


def _clusters(groups: list[_Group], min_prefix: int) -> list[tuple[int, list[_Group]]]:
    """Groups whose contexts share their first min_prefix tokens or more, with the length P of the prefix all of
    a cluster's contexts share (each keeps at least one token of its own); P = 0 for groups sharing nothing.

    Contexts sorted by their tokens put the ones with a common start next to each other (an MMLU subject's
    k-shot block). A run of neighbours sharing min_prefix tokens is split where that saves more tokens: the
    first questions of a subject, whose shots differ (the question itself is left out), share only the first
    shot with the rest and would otherwise shorten the whole subject's prefix to it. Only short-RoPE contexts
    share: keys rotated with LongRoPE's short factors do not serve a sequence that needs the long ones.
    """
    def common(a: tuple, b: tuple) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def split(run: list[_Group], lcp: list[int]) -> list[tuple[int, list[_Group]]]:
        """(P, groups) parts of a run, lcp[i] shared by run[i] and run[i + 1], saving the most tokens. The run
        is cut wherever its shared length is at its lowest; the depth is the number of distinct lengths."""
        if len(run) == 1:
            return [(0, run)]
        low = min(lcp)
        P = min(low, min(len(g.context) for g in run) - 1)  # each context keeps a token of its own
        whole = [(P, run)] if P >= min_prefix else [(0, [g]) for g in run]
        if low == max(lcp):  # no part shares more than the whole run does
            return whole
        parts, start = [], 0
        for i, n in enumerate(lcp + [low]):
            if n == low:
                parts += split(run[start:i + 1], lcp[start:i])
                start = i + 1
        saved = lambda ps: sum(p * (len(gs) - 1) for p, gs in ps)  # noqa: E731
        return parts if saved(parts) > saved(whole) else whole

    lone = [(0, [g]) for g in groups if g.long_rope]
    ordered = sorted((g for g in groups if not g.long_rope), key=lambda g: g.context)
    lcp = [common(a.context, b.context) for a, b in zip(ordered, ordered[1:])]
    out, start = [], 0
    for i in range(len(ordered)):
        if i == len(ordered) - 1 or lcp[i] < min_prefix:  # a run of neighbours ends here
            out += split(ordered[start:i + 1], lcp[start:i])
            start = i + 1
    return out + lone


def _cache_rows(batch: list[_Group], prefix: int) -> int:
    """KV cache rows a batch needs: one per option when some option runs after its context, else one per
    context when they start from a shared prefix, else none (a plain causal forward)."""
    if any(g.tail for g in batch):
        return sum(len(g.members) for g in batch)
    return len(batch) if prefix else 0


def _batches(groups: list[_Group], prefix: int, batch_tokens: int, max_rows: int, cache_slots: int):
    """Groups sorted by length (longest first), cut into batches of at most batch_tokens padded tokens (the
    tokens after a shared prefix of `prefix`) whose KV cache holds at most cache_slots (row x position) slots."""
    def size(g: _Group) -> int:
        return len(g.context) - prefix + g.tail

    groups = sorted(groups, key=lambda g: (-size(g), g.context))
    batch: list[_Group] = []
    for g in groups:
        T = size(batch[0]) if batch else size(g)  # the first is the longest
        if batch and ((len(batch) + 1) * T > batch_tokens or len(batch) >= max_rows
                      or _cache_rows(batch + [g], prefix) * (prefix + T) > cache_slots):
            yield batch
            batch = []
        batch.append(g)
    if batch:
        yield batch


@torch.no_grad()
def loglikelihoods(model: Phi3, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int | None = None,
                   batch_tokens: int = 4096, max_rows: int = 64, min_prefix: int = 64, cache_bytes: int = 2 << 30,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids) request, in order.

    max_len: the model's context (default cfg.max_seq_len). batch_tokens bounds a batch's padded size
    (rows x longest row), cache_bytes its KV cache (2 GiB: a batch with a long shared prefix or long
    options has fewer rows); contexts sharing their first min_prefix tokens or more (k-shot prompts)
    compute that shared start once; progress(n) is called with the number of requests each batch finished.
    """
    max_len = max_len or model.cfg.max_seq_len
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = model.norm.weight.device
    cfg = model.cfg
    slot_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.cache_dtype.itemsize
    slots = max(cache_bytes // slot_bytes, 1)
    cache = _Cache(model, slots)
    try:
        for P, cluster in _clusters(_group(model, requests, max_len), min_prefix):
            prefix_kv = _prefix_kv(model, cluster[0].context[:P], device) if P else None
            for batch in _batches(cluster, P, batch_tokens, max_rows, slots):
                for i, logp in _score_batch(model, batch, device, cache, prefix_kv).items():
                    target = torch.tensor(requests[i][1], device=device)[-len(logp):]
                    results[i] = (float(logp.gather(-1, target[:, None]).sum()),
                                  bool((logp.argmax(-1) == target).all()))
                if progress is not None:
                    progress(sum(len(g.members) for g in batch))
    finally:
        model.remove_cache()
    return results  # type: ignore[return-value]


class _Cache:
    """The model's KV cache, kept from batch to batch and grown when a batch needs more rows or positions:
    a fresh allocation per batch costs its page faults again (the memory is touched anew). Grown in both
    dimensions only within the budget of `slots` (rows x positions); else allocated as the batch needs."""

    def __init__(self, model: Phi3, slots: int):
        self.model, self.slots, self.rows, self.length = model, slots, 0, 0

    def ensure(self, rows: int, length: int) -> None:
        if rows > self.rows or length > self.length or self.model.cache_rope_long is None:
            grown = (max(rows, self.rows), max(length, self.length))
            self.rows, self.length = grown if grown[0] * grown[1] <= self.slots else (rows, length)
            self.model.remove_cache()
            self.model.setup_cache(self.rows, self.length)


def _prefix_kv(model: Phi3, prefix: tuple[int, ...], device) -> list[tuple]:
    """Each layer's cached keys and values (and int8 scales) of a prefix run alone at positions 0..P-1."""
    P = len(prefix)
    model.remove_cache()
    model.setup_cache(1, P)
    model(torch.tensor([prefix], device=device), torch.arange(P, device=device)[None], rows=slice(0, 1),
          rope_long=torch.zeros(1, dtype=torch.bool, device=device), last_only=True)
    kv = [tuple(None if t is None else t[0, :, :P].clone() for t in (c.k, c.v, c.k_scale, c.v_scale))
          for c in (b.self_attn.kv_cache for b in model.layers)]
    model.remove_cache()
    return kv


def _score_batch(model: Phi3, batch: list[_Group], device, cache: _Cache,
                 prefix_kv: list[tuple] | None = None) -> dict[int, torch.Tensor]:
    """Log-probabilities (len(continuation), V) predicting each continuation token, per request index.

    Phase 1 runs the contexts (right-padded: attention is causal, so no real token sees the padding) and
    keeps the last context position's logits. If some continuation is longer than one token, or the
    contexts start with a shared prefix (prefix_kv, computed once: its keys and values are copied in
    first and the contexts run from position P on), the contexts run into a KV cache, each in the first
    of its group's rows; phase 2 copies them to the group's other rows and runs every option's tokens
    (but the last) after its context, at positions len(context)...
    """
    P = 0 if prefix_kv is None else prefix_kv[0][0].shape[1]
    G, T = len(batch), max(len(g.context) for g in batch) - P
    ids = torch.zeros(G, T, dtype=torch.long, device=device)
    last = torch.zeros(G, T, dtype=torch.bool, device=device)
    for b, g in enumerate(batch):
        ids[b, :len(g.context) - P] = torch.tensor(g.context[P:], device=device)
        last[b, len(g.context) - P - 1] = True
    long_rope = torch.tensor([g.long_rope for g in batch], device=device)
    tail = max(g.tail for g in batch)
    if tail == 0 and P == 0:
        cache.model.remove_cache()
        cache.rows = 0
        first = model(ids, rope_long=long_rope, select=last).float().log_softmax(-1)  # (G, V)
        return {i: first[b, None] for b, g in enumerate(batch) for i, _ in g.members}

    starts = [0]
    for g in batch[:-1]:
        starts.append(starts[-1] + (len(g.members) if tail else 1))  # each group's first cache row
    n_rows = _cache_rows(batch, P)
    cache.ensure(n_rows, P + T + tail)
    layers = [b.self_attn.kv_cache for b in model.layers]
    rows = torch.tensor(starts, device=device)
    model.cache_rope_long[:n_rows] = False  # (a row's LongRoPE list is set by its first call below)
    if P:
        for kv, saved in zip(layers, prefix_kv):
            kv.zero_until(P)  # the slots below P now hold values: the cache must not zero them later
            for t, src in zip((kv.k, kv.v, kv.k_scale, kv.v_scale), saved):
                if t is not None:
                    t[rows, :, :P] = src
    first = model(ids, P + torch.arange(T, device=device).expand(G, T), rows=rows, rope_long=long_rope,
                  select=last).float().log_softmax(-1)
    if tail == 0:
        return {i: first[b, None] for b, g in enumerate(batch) for i, _ in g.members}
    src = [s for g, s in zip(batch, starts) for _ in g.members[1:]]
    dst = [s + k for g, s in zip(batch, starts) for k in range(1, len(g.members))]
    if src:
        src_t, dst_t = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        for kv in layers:
            for t in (kv.k, kv.v, kv.k_scale, kv.v_scale):
                if t is not None:
                    t[dst_t, :, :P + T] = t[src_t, :, :P + T]
        model.cache_rope_long[dst_t] = model.cache_rope_long[src_t]
    # every option of every group: its tokens but the last, right-padded to `tail`
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
