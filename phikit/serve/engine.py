"""The serving engine: one thread owns the model and runs a continuous-batching scheduler.

The model gets one static KV cache of `max_batch` rows (slots) x `max_context` positions. Each loop
iteration of the engine thread:

1. admits waiting requests into free slots: each prompt is prefilled into its own row, alone
   (`prefill`, rows=slice(s, s + 1)), so a prompt's logits never depend on its neighbours;
2. drops cancelled requests (a client that went away), then samples one token for every active
   slot with that request's own Sampling, generator and penalties, turns it into text with its own
   StreamDecoder and stop strings, and hands the new text to the request's `emit` callback;
   a finished sequence leaves its slot at once;
3. runs one decode step for rows 0..k-1 together, k = the highest busy slot + 1 (`decode_one`:
   rows=slice(0, k), a view of the cache, no gather). New requests take the lowest free slot, so
   the batch stays packed; a free slot below k decodes a dummy token at position 0, which costs
   little (the step reads every weight once for the whole batch) and is overwritten by the next
   prefill into that row.

LoRA adapters: a request names one of the model's adapters (`Request.adapter`), or None for the model as
loaded (its active adapter, normally none: the base). Requests with different adapters share the batch:
before each forward, `set_row_adapters` gives every row its request's adapter (a prefill's batch is its one
row), and afterwards the model goes back to its active adapter. A model without LoRA layers skips this.
The per-row selection indexes the batch in Python, so `decode_fn` must be eager (generate.decode_one)
when the model has adapters; `phikit serve` refuses --compile with --adapter.

Speculative decoding (speculate.py) is per request: `Request.speculate` names one of the engine's
drafters (`drafters`, e.g. {"prompt-lookup": PromptLookup(), "draft-model": DraftModel(m)}). Before the
batched step, each speculating row with drafts verifies them in its own call (speculate.verify: k+1
decode rows on its cache row i) and its next tokens are decided there; the batched step then covers the
other rows (a speculating row below the last of them runs its last token again at its own position:
the same keys and values, its logits unused). A speculating row gets several tokens per step, each its
own Event; its output is its plain output (greedy: the same tokens). Each verification reads every
weight for its one sequence, so speculation runs only while at most SPECULATE_MAX_ROWS (2) sequences are
active; with more, the speculating rows join the batched step (one weight read for all). Drafters keep their state per cache
row and notice a new request in a row by its tokens (a draft model's cache follows the row by common
prefix). A draft model's KV cache (max_batch x max_context) is not counted in `phikit serve`'s plan.

Each row keeps its own position and its own LongRoPE factor choice: a sequence that grows past
`original_max_seq_len` is run again from position 0 with the long factors, exactly as
`phikit.generate` does (see model.py `_check_cache_rope`). Greedy output is therefore the same
whether a request runs alone or in a full batch (tested).

The HTTP side never touches the model: it submits a `Request` whose `emit` is thread-safe (the app
passes `loop.call_soon_threadsafe(queue.put_nowait, event)`), and may `cancel` it at any time.

Limitations: a prompt is prefilled whole (in chunks of generate.PREFILL_CHUNK tokens, back to
back), so a long prompt stalls the running batch for its duration (interleaving those chunks with
decode steps, as vLLM's chunked-prefill scheduler does, is the cure); the waiting queue is unbounded.

References: vLLM `v1/core/sched/scheduler.py` (continuous batching), llama.cpp `tools/server/server.cpp`
(slots, `update_slots`), mlx-lm `server.py`; Orca (Yu et al., OSDI 2022) for iteration-level scheduling.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generate import (Sampling, _find_stop, _partial_stop_len, apply_repetition_penalty, decode_one, prefill, sample,
                        seen_after)
from ..model import Phi3
from ..tokenizer import Tokenizer
from ..train.lora import adapter_names, lora_layers, set_active, set_row_adapters

log = logging.getLogger("phikit.serve")
SPECULATE_MAX_ROWS = 2  # speculate while this few sequences are active; beyond, batching pays more


@dataclass
class Event:
    """What the engine reports for a request: new text, and once, a finish reason with the token counts."""
    text: str = ""
    finish_reason: str | None = None  # "stop" (stop id or string), "length" (max_tokens), "error", "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One completion: prompt ids, limits, sampling and stop conditions, and where its events go."""
    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[Event], None]  # called on the engine thread; must be thread-safe and quick
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    presence_penalty: float = 0.0   # OpenAI semantics: over the generated tokens (as vLLM)
    frequency_penalty: float = 0.0
    adapter: str | None = None      # a LoRA adapter of the model (Engine.adapters); None: the model as loaded
    speculate: str | None = None    # one of Engine.drafters (e.g. "prompt-lookup"); None: plain decoding
    show_special: bool = False      # the text of special tokens that are not stop ids (hidden by default)
    cancelled: bool = False         # set by Engine.cancel from any thread; read once per step


class EngineClosed(RuntimeError):
    """The engine no longer admits requests (shutting down)."""


class _Slot:
    """A running request in one cache row: its tokens so far, detokenizer, RNG and stop-string state."""

    def __init__(self, req: Request, tokenizer: Tokenizer, vocab: int, device, drafter=None):
        self.req = req
        self.history = list(req.prompt)  # every token of the row, for a LongRoPE re-prefill and the drafter
        self.drafter = drafter
        self.new: list[int] | None = None  # the next tokens, when a speculative step decided them
        self.decoder = tokenizer.stream(skip_special_tokens=not req.show_special)
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # per request: no cross-talk
        self.pending = ""  # text held back because it may begin a stop string
        self.n = 0         # tokens generated
        self.counts = torch.zeros(vocab, device=device) if req.presence_penalty or req.frequency_penalty else None
        self.seen = None
        if req.sampling.repetition_penalty != 1.0:  # phikit's CTRL penalty sees the prompt too
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(self.history, device=device)] = True

    def penalize(self, logits: torch.Tensor, drafts: Sequence[int] = ()) -> torch.Tensor:
        """This request's penalties on logits (k+1, V): row j also counts the first j drafted tokens."""
        if self.seen is not None:
            seen = seen_after(self.seen, drafts)
            logits = apply_repetition_penalty(logits, seen, self.req.sampling.repetition_penalty)
        if self.counts is not None:
            counts = self.counts.expand(len(drafts) + 1, -1).clone()
            for j, d in enumerate(drafts):
                counts[j + 1:, d] += 1
            logits = logits - self.req.frequency_penalty * counts - self.req.presence_penalty * (counts > 0)
        return logits

    def next_token(self, logits: torch.Tensor) -> int:
        """Apply this request's penalties to logits (V,) and sample one token."""
        return int(sample(self.penalize(logits[None]), self.req.sampling, self.generator)[0])

    def accept(self, tok: int) -> Event:
        """Turn one new token into an Event (text, and a finish reason when done), as `stream_text` does."""
        req = self.req
        self.n += 1
        if self.seen is not None:
            self.seen[tok] = True
        if self.counts is not None:
            self.counts[tok] += 1
        finish, text, hit = None, "", -1
        if tok in req.stop_ids:
            finish = "stop"  # the stop token counts as generated, its text is not shown
        else:
            self.pending += self.decoder.step(tok)
            hit = _find_stop(self.pending, req.stop_strings)
            if hit >= 0:
                finish = "stop"
            else:
                keep = _partial_stop_len(self.pending, req.stop_strings)
                text, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        if finish is None and self.n >= req.max_tokens:
            finish = "length"
        if finish is not None:
            if hit < 0:  # the decoder may still hold bytes, which may complete a stop string
                self.pending += self.decoder.flush()
                hit = _find_stop(self.pending, req.stop_strings)
                if hit >= 0:
                    finish = "stop"
            text += self.pending[:hit] if hit >= 0 else self.pending
            self.pending = ""
            return Event(text, finish, len(req.prompt), self.n)
        return Event(text)


class Engine:
    """Owns the model on its own thread; `submit` requests from any thread, `cancel` them, `close` at exit."""

    def __init__(self, model: Phi3, tokenizer: Tokenizer, max_batch: int = 8, max_context: int = 2048,
                 decode_fn=decode_one, drafters: dict | None = None):
        if max_batch < 1 or max_context < 2:
            raise ValueError("max_batch must be >= 1 and max_context >= 2")
        self.model, self.tokenizer = model, tokenizer
        self.decode_fn = decode_fn  # generate.decode_one, or compile_decode's step for a model without LoRA
        self.speculate_max_rows = SPECULATE_MAX_ROWS
        self.drafters = dict(drafters or {})  # name -> speculate.Drafter, chosen per request (Request.speculate)
        self.max_batch, self.max_context = max_batch, max_context
        self.device = model.norm.weight.device  # norms are never quantized
        self.vocab = model.cfg.vocab_size
        self.slots: list[_Slot | None] = [None] * max_batch
        self.logits = torch.zeros(max_batch, self.vocab, device=self.device)  # next-token logits of each active row
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._stop_now = False
        self.steps = 0  # decode steps run, for tests and stats
        layers = [layer for _, layer in lora_layers(model)]
        self._lora = bool(layers)
        self.default_adapter = layers[0].active if layers else None  # what a request without an adapter gets
        # the adapters a request may name (the default one is the model itself)
        self.adapters = [n for n in adapter_names(model) if n != self.default_adapter]
        for drafter in self.drafters.values():  # here, so that a draft model that cannot serve raises here
            drafter.start(model, max_batch, max_context)
        self._thread = threading.Thread(target=self._run, name="phikit-engine", daemon=True)
        self._thread.start()

    # ---- called from other threads -------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Queue a request; it joins the running batch at the next step with a free slot."""
        if not req.prompt or len(req.prompt) >= self.max_context:
            raise ValueError(f"a prompt needs 1 to {self.max_context - 1} tokens, got {len(req.prompt)}")
        if req.max_tokens < 1 or len(req.prompt) + req.max_tokens > self.max_context:
            raise ValueError(f"max_tokens must be in 1..{self.max_context - len(req.prompt)}")
        if req.adapter is not None and req.adapter not in self.adapters:
            raise ValueError(f"no adapter named {req.adapter!r} (this model has: {', '.join(self.adapters) or 'none'})")
        if req.speculate is not None and req.speculate not in self.drafters:
            raise ValueError(f"no drafter named {req.speculate!r} (this server has: "
                             f"{', '.join(self.drafters) or 'none'})")
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            self._waiting.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """Stop a request: it leaves the batch before the next token is sampled (no further events)."""
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop admitting; finish the requests in flight (or cancel them), then stop the thread."""
        with self._cond:
            self._closed = True
            if cancel:
                self._stop_now = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        self.model.setup_cache(self.max_batch, self.max_context)
        try:
            with torch.no_grad():
                while self._wait_for_work():
                    try:
                        self._step()
                    except Exception as e:  # never let one bad step kill the server: fail what was running
                        log.exception("engine step failed")
                        for i, slot in enumerate(self.slots):
                            if slot is not None:
                                self._finish(i, Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
        finally:
            for req in self._drain():
                self._emit(req, Event(finish_reason="cancelled", error="the server is shutting down"))
            for i, slot in enumerate(self.slots):
                if slot is not None:
                    self._finish(i, Event(finish_reason="cancelled", error="the server is shutting down"))
            self.model.remove_cache()
            for drafter in self.drafters.values():
                drafter.stop()

    def _wait_for_work(self) -> bool:
        """Block while idle; False once closed with nothing left to do (or told to stop now)."""
        with self._cond:
            while not self._waiting and self.active == 0 and not self._closed:
                self._cond.wait()
            if self._stop_now:
                return False
            return bool(self._waiting) or self.active > 0

    def _drain(self) -> list[Request]:
        with self._cond:
            reqs, self._waiting = list(self._waiting), collections.deque()
        return reqs

    def _step(self) -> None:
        self._admit()
        for i, slot in enumerate(self.slots):  # one token per active row (a speculating row: maybe several)
            if slot is None:
                continue
            if slot.req.cancelled:
                self.slots[i] = None
                continue
            tokens, slot.new = slot.new or [slot.next_token(self.logits[i])], None
            for tok in tokens:
                event = slot.accept(tok)
                if event.finish_reason is not None:
                    self._finish(i, event)
                    break
                slot.history.append(tok)
                self._emit(slot.req, event)
        if self.active:
            self._decode()

    def _admit(self) -> None:
        """Prefill waiting requests into the lowest free slots, oldest first."""
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        while free:
            with self._cond:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled:
                continue
            i = free[0]
            try:
                slot = _Slot(req, self.tokenizer, self.vocab, self.device, self.drafters.get(req.speculate))
                self.logits[i] = self._prefill(i, slot)
            except Exception as e:  # this request alone fails (e.g. a token id the model does not have)
                log.exception("prefill failed")
                self._emit(req, Event(finish_reason="error", error=f"{type(e).__name__}: {e}",
                                      prompt_tokens=len(req.prompt)))
                continue
            self.slots[free.pop(0)] = slot

    def _decode(self) -> None:
        """Speculating rows verify their drafts, each alone; then one step for the other rows together (a row
        crossing the LongRoPE switch point is re-prefilled first)."""
        # a verification reads every weight for one sequence, as the batched step does for all: with more than
        # SPECULATE_MAX_ROWS sequences running, batching beats speculating, and every row takes the batched step
        speculate = self.active <= self.speculate_max_rows
        for i, slot in enumerate(self.slots):
            if speculate and slot is not None and slot.drafter is not None:
                last = torch.tensor([[len(slot.history) - 1]])
                if bool(self.model.rope.use_long(last) == self.model.cache_rope_long[i].cpu()):  # not crossing
                    with self._adapter(slot.req.adapter):  # the verification's rows are all this request's
                        slot.new = slot.drafter.step(self.model, i, slot.history, slot.req.max_tokens - slot.n,
                                                     self.max_context, slot.penalize, slot.req.sampling,
                                                     slot.generator)
        plain = [i for i, slot in enumerate(self.slots) if slot is not None and slot.new is None]
        if not plain:
            self.steps += 1
            return
        k = max(plain) + 1
        tokens = torch.zeros(k, dtype=torch.long)
        pos = torch.zeros(k, dtype=torch.long)  # free rows: dummy token 0 at position 0
        for i, slot in enumerate(self.slots[:k]):
            if slot is not None:
                tokens[i], pos[i] = slot.history[-1], len(slot.history) - 1
        tokens, pos = tokens.to(self.device), pos.to(self.device)
        crossing = self.model.rope.use_long(pos[:, None]) != self.model.cache_rope_long[:k]
        fresh = {i: self._prefill(i, self.slots[i])
                 for i in torch.nonzero(crossing).flatten().tolist() if self.slots[i] is not None}
        with self._row_adapters([slot.req.adapter if slot is not None else None for slot in self.slots[:k]]):
            self.logits[:k] = self.decode_fn(self.model, tokens, pos).float()  # rows 0..k-1 of the cache
        for i, row_logits in fresh.items():
            self.logits[i] = row_logits
        self.steps += 1

    def _prefill(self, i: int, slot: _Slot) -> torch.Tensor:
        """Run the slot's tokens so far into cache row i, with its adapter; the logits (V,) of the last one."""
        with self._row_adapters([slot.req.adapter]):
            return prefill(self.model, torch.tensor(slot.history, device=self.device), i).float()

    @contextlib.contextmanager
    def _adapter(self, name: str | None):
        """Every row of the forwards within uses adapter name (None: the default adapter)."""
        if not self._lora:
            yield
            return
        set_active(self.model, self.default_adapter if name is None else name)
        try:
            yield
        finally:
            set_active(self.model, self.default_adapter)

    @contextlib.contextmanager
    def _row_adapters(self, names: list[str | None]):
        """Row j of the forwards within uses the adapter of names[j] (None: the default adapter)."""
        if not self._lora:
            yield
            return
        set_row_adapters(self.model, [self.default_adapter if n is None else n for n in names])
        try:
            yield
        finally:
            set_row_adapters(self.model, None)

    def _finish(self, i: int, event: Event) -> None:
        slot, self.slots[i] = self.slots[i], None
        if event.prompt_tokens == 0:
            event.prompt_tokens, event.completion_tokens = len(slot.req.prompt), slot.n
        self._emit(slot.req, event)

    def _emit(self, req: Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # the receiving side is gone (e.g. its event loop closed): stop generating for it
            req.cancelled = True
