"""Speculative decoding: draft a few tokens cheaply, verify them in one forward pass of the model, keep
those the model agrees with and one token of its own.

Two drafters propose the next k tokens of a sequence:
- `PromptLookup` finds the latest earlier occurrence of the context's last n tokens (n = 4 down to 3) in
  the context so far (prompt and output) and proposes the k = 8 tokens that followed it: free drafts for
  output that copies its input (rewriting, quoting, editing a given text or code). No match, no draft:
  the step is a plain decode step.
- `DraftModel` runs a smaller phikit model with the same tokenizer, k one-token steps through its own KV
  cache. Its cache follows the sequence by common prefix: after a rejection the next call writes at the
  first position that differs, so nothing is copied or undone.

Verification (`verify`): the model runs [t, d1 .. dk], t the last token emitted and d the drafts, at
positions p .. p+k in one call through its cache, as k+1 decode rows sharing the sequence's cache row;
row j of the logits is the next-token distribution after d_j, bit for bit what k+1 decode steps give
(where the kernels round each row alike). The cache is never rolled back either: the next forward
writes at the first position past the accepted tokens, and the stale slots beyond are masked until they
are overwritten (every forward writes its own positions before it attends to them).

Acceptance (`accept`), with p the distribution plain sampling draws from (generate.probs: temperature,
top-k, top-p, min-p, after the penalties, which see each row's accepted drafts) and q the draft's:
- greedy: keep d_j while it is the argmax of row j-1, then emit the argmax of the first row that
  disagrees (or of row k): token for token what plain greedy decoding emits, wherever a k+1-row matmul
  rounds each row as a one-row one does (the quantized kernels do; float GEMMs may differ by an ulp);
  tested on tiny models and on SmolLM2 (bench/speculate.py checks every prompt).
- sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318): accept d_j with
  probability min(1, p(d_j) / q(d_j)); on the first rejection draw from norm(max(0, p - q)); when all k
  are accepted draw from row k. Every emitted token is then distributed as under plain sampling (tested
  with a chi-square bound that the unconditional rule fails). Prompt lookup's q is one-hot: accept with
  probability p(d), on rejection draw from p without d. The random draws differ from plain sampling's, so a
  seed gives another (equally distributed) text than without speculation.

One sequence at a time: `generate()` speculates for batch size 1, the server per request in the
request's own verification forward (engine.py). Near the LongRoPE switch point the drafts are cut so
that a verification never mixes the short and long factor lists (model.py `_check_cache_rope`); the
step that crosses is the plain re-prefill.

References: transformers `generation/candidate_generator.py` (PromptLookupCandidateGenerator,
AssistedCandidateGenerator) and `utils.py::_speculative_sampling`; vLLM `v1/spec_decode/ngram_proposer.py`
and `v1/sample/rejection_sampler.py`; Saxena 2023, prompt lookup decoding (github.com/apoorvumang).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .fused_decode import fused_decoder
from .generate import Sampling, prefill, probs
from .model import Phi3
from .tokenizer import Tokenizer

Penalize = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]  # (logits (k+1, V), drafts) -> logits


class Drafter:
    """What generate() and the server call: start/stop around a run, step() once per decoding step.

    A drafter proposes up to k tokens (`propose`, its own); `step` verifies and accepts them. The totals
    drafted / accepted (drafts the model kept) / verified (forward passes) give the acceptance rate.
    """

    name = ""
    k = 0

    def __init__(self):
        self.drafted = self.accepted = self.verified = 0
        self._length: dict[int, tuple[tuple[int, ...], int, int]] = {}  # row -> (prompt head, context length, k)

    def start(self, model: Phi3, batch: int, max_len: int) -> None:
        """Before a run of `model` over `batch` cache rows of max_len positions."""

    def stop(self) -> None:
        """After the run."""

    def propose(self, row: int, context: list[int], k: int, sampling: Sampling, generator=None):
        """Up to k tokens after context, and their draft probabilities (k, V) or None if they are certain."""
        raise NotImplementedError

    def step(self, model: Phi3, row: int, context: list[int], left: int, max_len: int, penalize: Penalize,
             sampling: Sampling, generator: torch.Generator | None = None) -> list[int] | None:
        """Draft after context (its last token is not yet in the model's cache), verify and accept: the next
        tokens to emit (the accepted drafts and one more, at most `left`), or None when nothing was drafted
        (the caller runs a plain decode step).

        The draft length adapts per sequence: after a draft the model kept whole, the next may be twice as
        long (up to self.k); after a rejection, one longer than what was kept. A verification of k + 1 rows
        costs more than a plain step (SmolLM2-135M Q4_1: ~1.35 + 0.08 (k + 1) steps), so drafts that keep
        failing shrink to 1 or 2 tokens instead of costing a long verification each time (chat answers,
        bench/speculate.py, 2 threads: worst prompt 0.92x plain with k fixed at 8, 0.97x so; copying prompts
        1.69x -> 1.62x); the output does not depend on it.
        """
        head, n, k = self._length.get(row, ((), 0, self.k))
        if head != tuple(context[:16]) or n > len(context):  # another sequence in this row
            k = self.k
        k = room(model, row, len(context) - 1, k, left, max_len)
        drafts, q = self.propose(row, context, k, sampling, generator) if k > 0 else ([], None)
        if not drafts:
            return None
        new = accept(penalize(verify(model, row, context, drafts), drafts), drafts, q, sampling, generator)
        kept = len(new) - 1
        self._length[row] = (tuple(context[:16]), len(context), min(self.k, 2 * len(drafts)) if kept == len(drafts)
                             else kept + 1)
        self.drafted += len(drafts)
        self.accepted += kept
        self.verified += 1
        return new

    def summary(self) -> str:
        """One line: drafted and accepted tokens (e.g. for --verbose)."""
        if not self.drafted:
            return f"{self.name}: nothing drafted"
        return (f"{self.name}: {self.accepted} of {self.drafted} drafted tokens accepted "
                f"({100 * self.accepted / self.drafted:.0f}%) in {self.verified} verifications")


class PromptLookup(Drafter):
    """Drafts copied from the context: what followed the latest earlier occurrence of its last n tokens.

    The defaults, from SmolLM2-135M Q4_1 on bench/speculate.py's prompts, where a verification of k+1 rows
    costs about 1.35 + 0.08 (k+1) plain decoding steps: matching 2-token n-grams as well drafts often on
    chat answers and mostly in vain (0.95x plain at worst there, by that cost), 3 and more do not (1.00x at
    worst, and 1.9x on copying tasks); k = 8 beats k = 4 (1.9x against 1.7x), as a rejected draft costs
    little more than a short one.
    """

    name = "prompt-lookup"

    def __init__(self, k: int = 8, max_ngram: int = 4, min_ngram: int = 3):
        super().__init__()
        if k < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError("need k >= 1 and 1 <= min_ngram <= max_ngram")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram
        self._rows: dict[int, tuple[list[int], list[dict]]] = {}

    def start(self, model: Phi3, batch: int, max_len: int) -> None:
        self._rows = {}

    def stop(self) -> None:
        self._rows = {}

    def propose(self, row: int, context: list[int], k: int, sampling: Sampling, generator=None):
        """Up to k drafted tokens after context, and None (the drafts are certain: q is one-hot)."""
        index = self._index(row, context)
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            j = index[n - self.min_ngram].get(tuple(context[L - n:]))
            if j is not None:  # context[j] followed an earlier occurrence; a run that reaches the end repeats
                out: list[int] = []
                for i in range(j, j + k):
                    out.append(context[i] if i < L else out[i - L])
                return out, None
        return [], None

    def _index(self, row: int, context: list[int]):
        """The row's n-gram index, {n-gram: index of the token after its latest occurrence} per n, brought
        up to date with context (and rebuilt when context is not an extension of what was indexed)."""
        seen, index = self._rows.get(row, ([], []))
        if not index or len(seen) > len(context) or context[:len(seen)] != seen:
            seen, index = [], [{} for _ in range(self.min_ngram, self.max_ngram + 1)]
        for i in range(len(seen), len(context)):
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                index[n - self.min_ngram][tuple(context[i - n:i])] = i
        self._rows[row] = (list(context), index)
        return index


class DraftModel(Drafter):
    """Drafts from a smaller model with the same tokenizer, with its own KV cache (one row per sequence)."""

    name = "draft-model"

    def __init__(self, model: Phi3, k: int = 4):
        super().__init__()
        if k < 1:
            raise ValueError("need k >= 1")
        self.model, self.k = model, k
        self._cached: dict[int, list[int]] = {}  # per row: the tokens whose keys and values are in the cache

    def start(self, model: Phi3, batch: int, max_len: int) -> None:
        if self.model is model:
            raise ValueError("the draft model is the model itself: each needs its own KV cache (load it twice)")
        if self.model.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {self.model.cfg.vocab_size} ids, the model's "
                             f"{model.cfg.vocab_size}")
        self.model.setup_cache(batch, max_len)
        self._cached = {}

    def stop(self) -> None:
        self.model.remove_cache()
        self._cached = {}

    @torch.no_grad()
    def propose(self, row: int, context: list[int], k: int, sampling: Sampling, generator=None):
        """k drafted tokens after context and their draft probabilities (k, V), None when greedy (one-hot)."""
        drafts, qs = [], []
        for j in range(k):
            logits = self._feed(row, context + drafts)[None].float()
            q = probs(logits, sampling)
            d = int(q.argmax(-1)) if sampling.temperature == 0 else int(torch.multinomial(q, 1, generator=generator))
            drafts.append(d)
            qs.append(q[0])
        return drafts, None if sampling.temperature == 0 else torch.stack(qs)

    def _feed(self, row: int, tokens: list[int]) -> torch.Tensor:
        """The draft's next-token logits (V,) after tokens, running only those its cache row lacks."""
        m = self.model
        cached = self._cached.get(row, [])
        n = min(len(cached), len(tokens) - 1)  # at least the last token runs: its logits are wanted
        if cached[:n] != tokens[:n]:  # the longest common prefix, by bisection (list compares run in C)
            lo, hi = 0, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if cached[:mid] == tokens[:mid] else (lo, mid)
            n = lo
        device = m.norm.weight.device
        if n > 0 and bool(m.rope.use_long(torch.tensor([[len(tokens) - 1]])) != m.cache_rope_long[row].cpu()):
            n = 0  # the draft's own LongRoPE switch: run the whole sequence again (generate() does the same)
        if n == 0:
            logits = prefill(m, torch.tensor(tokens, device=device), row)
        else:
            pos = torch.arange(n, len(tokens), device=device)[None]
            idx = torch.tensor(tokens[n:], device=device)[None]
            logits = m(idx, pos, rows=slice(row, row + 1), last_only=True)[0, -1]
        self._cached[row] = list(tokens)
        return logits


def room(model: Phi3, row: int, last_pos: int, k: int, left: int, max_len: int) -> int:
    """How many tokens may be drafted after the token at last_pos: at most k, one less than the `left`
    tokens still to emit, within the cache (max_len positions), and on the row's current LongRoPE list."""
    n = min(k, left - 1, max_len - 1 - last_pos)
    if model.cfg.longrope and not bool(model.cache_rope_long[row]):  # the short list ends at original_max_seq_len
        n = min(n, model.cfg.original_max_seq_len - 1 - last_pos)
    return max(n, 0)


@torch.no_grad()
def verify(model: Phi3, row: int, context: list[int], drafts: list[int]) -> torch.Tensor:
    """The model's next-token logits (k+1, V) after context[-1] and after each draft, in one call that
    writes them at positions len(context)-1 onwards of cache row `row`.

    The k+1 tokens go in as k+1 one-token decode rows that all read and write cache row `row`, so each
    is computed exactly as a decode step computes it (same kernels, same rounding): greedy output is then
    plain greedy's to the token even where activations are rounded to int8 (the quantized kernels), which a
    (1, k+1) forward is not (its attention runs through SDPA: SmolLM2 Q4_1 differed from plain at token
    15 of a rewrite that way, and agreed on 12 of 12 prompts this way). Each row writes its key and value
    before any row attends, and row j attends to the slots up to its own position (model.py _mask).
    """
    device = model.norm.weight.device
    T, start = len(drafts) + 1, len(context) - 1
    idx = torch.tensor([context[-1], *drafts], device=device)[:, None]  # (T, 1)
    pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    rows = torch.full((T,), row, device=device)
    fused = fused_decoder(model)
    if fused is not None:
        return fused(idx[:, 0], pos[:, 0], row=row).float()
    # the eager decode step: rows as an index, each query gets a copy of the row's cache (6x the fused step's time)
    return model(idx, pos, rows=rows)[:, -1].float()


def accept(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, s: Sampling,
           generator: torch.Generator | None = None) -> list[int]:
    """The tokens to emit: the accepted drafts, then one token of the model's own.

    logits (k+1, V) from verify(), penalties applied; q (k, V) the draft's probabilities, None for certain
    drafts (one-hot). The rules are the module docstring's.
    """
    if s.temperature == 0:
        best = logits.argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == best[a]:
            a += 1
        return drafts[:a] + [best[a]]
    p = probs(logits, s)  # (k+1, V)
    u = torch.rand(len(drafts), generator=generator, device=p.device).tolist()
    for j, d in enumerate(drafts):
        qd = 1.0 if q is None else float(q[j, d])
        if u[j] * qd < float(p[j, d]):  # u < p/q: accepted with probability min(1, p/q)
            continue
        residual = p[j].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[j]).clamp_min(0.0)
        if not float(residual.sum()) > 0:  # p <= q everywhere only by rounding: p itself
            residual = p[j]
        return drafts[:j] + [int(torch.multinomial(residual, 1, generator=generator))]
    return drafts + [int(torch.multinomial(p[-1], 1, generator=generator))]


def draft_mismatch(model: Phi3, tokenizer: Tokenizer | None, draft: Phi3,
                   draft_tokenizer: Tokenizer | None) -> str | None:
    """Why draft cannot draft for model (another vocabulary or tokenizer), or None."""
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        return f"its embedding has {draft.cfg.vocab_size} rows, the model's {model.cfg.vocab_size}"
    if tokenizer is None or draft_tokenizer is None:
        return "a tokenizer is missing, so the two cannot be compared"
    return tokenizer.difference(draft_tokenizer)
