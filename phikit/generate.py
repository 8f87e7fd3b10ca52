"""Generation: sampling, prefill, one decode step, and `generate()` as a token generator.

`generate()` is the one loop every front end shares (CLI, chat, and later the server): it yields,
step by step, the new token of each sequence in the batch. A batch may mix prompt lengths: each
prompt is prefilled into its own cache row, then all rows decode together, each at its own
position (and with its own LongRoPE factor list), so a sequence's tokens do not depend on what else
is in the batch. A sequence that crosses the LongRoPE switch point is run again from position 0
with the long factors (re-prefill, as transformers does; see rope.py for why re-rotating the
cached keys is not enough). `stream_text()` wraps it for one sequence, turning tokens into text and stopping
on stop strings. For one sequence, generate() can decode speculatively (speculate.py: prompt lookup or
a draft model, several tokens verified per forward pass, the same output).

References: gpt-fast `generate.py` (prefill, decode_one_token), mlx-lm `generate.py::generate_step`,
transformers `generation/logits_process.py` (top-p, min-p and repetition penalty semantics).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .fused_decode import fused_decoder
from .kv_cache import KVCache
from .memory import check_kv_cache
from .model import Phi3
from .tokenizer import Tokenizer


@dataclass
class Sampling:
    """Sampling settings. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 disable those filters."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # written so that NaN fails too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution (B, V) sample() draws from: filtered softmax, or one-hot at the argmax when greedy."""
    logits = logits.float()
    if s.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = logits.softmax(dim=-1)
    # top-k, top-p, then min-p: transformers' order (top-p measures mass before min-p removes any)
    if s.top_p < 1:  # smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = p.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= s.top_p, 0.0)
        p = torch.zeros_like(p).scatter(-1, order, sorted_p)
    if s.min_p > 0:  # keep tokens with p >= min_p * p_max
        p = p.masked_fill(p < s.min_p * p.amax(dim=-1, keepdim=True), 0.0)
    return p


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else filtered softmax sampling."""
    if s.temperature == 0:
        return logits.float().argmax(dim=-1)
    return torch.multinomial(probs(logits, s), 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (transformers' semantics): seen tokens' logits divided by p if > 0, else times p.

    logits (B, V) float; seen (B, V) bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def seen_after(seen: torch.Tensor, drafts: Sequence[int]) -> torch.Tensor:
    """(k+1, V) bool: row j is seen (V,) plus the first j drafted tokens, what the penalty sees at row j of
    a speculative verification."""
    rows = seen.expand(len(drafts) + 1, -1).clone()
    for j, d in enumerate(drafts):
        rows[j + 1:, d] = True
    return rows


PREFILL_CHUNK = 256  # prompt tokens per forward call (Phi-3-mini shapes, 512 tokens, 2 threads: int4 g128 109-144 ->
# 148-167 tokens/s, int8 92-133 -> 140-143, bf16 93-98 -> 99-101 against one call; 128 is no faster)


@torch.no_grad()
def prefill(model: Phi3, prompt: torch.Tensor, row: int, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run one prompt (T,) into cache row `row`; return the logits (V,) of its last position.

    A prompt longer than `chunk` tokens goes through in chunks, each attending to the cache the ones
    before it wrote (llama.cpp's n_batch), all with the LongRoPE list of the whole prompt. Activation
    memory is then that of `chunk` tokens whatever the prompt's length, and a CPU runs it faster:
    Phi-3-mini int4 g128, a 4000-token prompt at 2 threads: 60-63 -> 93-95 tokens/s, peak RSS 4.1 ->
    3.6 GiB (README). Each token is computed the same way, up to float rounding where a
    GEMM blocks differently for another row count (float32 ~1e-7 here; the quantized kernels give
    identical bits); the tests check the logits and the cache against one call.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    T = prompt.numel()
    pos = torch.arange(T, device=prompt.device)[None]
    rows = slice(row, row + 1)
    if model.cache_rope_long is None or T <= chunk:  # no cache: the chunks could not see each other
        return model(prompt[None], pos, rows=rows, last_only=True)[0, -1]
    max_len = model.layers[0].self_attn.kv_cache.max_len
    if T > max_len:  # refused before any chunk is written, as one call would be
        raise ValueError(f"position {T - 1} is beyond the cache size {max_len}")
    rope_long = model.rope.use_long(pos)
    for start in range(0, T, chunk):
        logits = model(prompt[None, start:start + chunk], pos[:, start:start + chunk], rows=rows, last_only=True,
                       rope_long=rope_long)
    return logits[0, -1]


@torch.no_grad()
def decode_one(model: Phi3, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One step for every cache row: tokens (B,) at positions (B,) -> logits (B, V).

    Where it applies (fused_decode.py: quantized, bf16 or float32 linear layers, no LoRA, on the CPU),
    the decoder blocks run in one C++ call with the eager step's logits to the bit: SmolLM2-135M
    (30 blocks) decodes about 1.7x faster; else the model's forward."""
    fused = fused_decoder(model)
    if fused is not None:
        return fused(tokens, input_pos)
    return model(tokens[:, None], input_pos[:, None])[:, -1]


def compile_decode(model: Phi3):
    """A decode_fn for generate(): decode_one compiled by torch.compile into one graph (Phi3.decode_step).

    Worth it on a CPU for long outputs and servers: the elementwise work between the matmuls (norms,
    RoPE, casts) is fused; Phi-3-mini int4 decoding measured 5-7% faster on 2 Zen 4 cores (README). The
    first call compiles (~30 s on 2 cores for 32 layers); a new batch size compiles once
    more, a new cache length does not. Logits match the eager path to rounding (fusion skips
    intermediate roundings).
    """
    step = torch.compile(model.decode_step, fullgraph=True)

    def decode(m: Phi3, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if m is not model:
            raise ValueError("this compiled decode step belongs to another model")
        input_pos = input_pos[:, None]  # (B, 1)
        model.prepare_decode_step(input_pos)
        for block in model.layers:  # a cache of another length must not compile the step again
            c = block.self_attn.kv_cache
            for t in (c.k, c.v, c.k_scale, c.v_scale):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 2)
        with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(force_parameter_static_shapes=False):
            warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")  # inductor's note on fp16 scales
            return step(tokens[:, None], input_pos)

    return decode


def generate(model: Phi3, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling | None = None,
             stop_ids: Sequence[int] = (), max_seq_len: int | None = None,
             decode_fn=decode_one, speculate=None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each prompt (None once a sequence has finished).

    A sequence finishes after emitting a stop id (which is yielded) or max_new_tokens tokens. The
    cache holds max_seq_len positions (default: longest prompt + max_new_tokens); a sequence that
    reaches it stops. `decode_fn` may be a compiled `decode_one`. `speculate`, a drafter of speculate.py
    (PromptLookup, DraftModel), for one prompt only: each step that drafts yields several steps' tokens
    from one forward pass; the output is plain decoding's (greedy: the same tokens; sampling: the same
    distribution, other draws).
    """
    sampling = sampling or Sampling()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if speculate is not None and len(prompts) != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time, got {len(prompts)} prompts")
    if max_new_tokens <= 0:
        return
    device = model.norm.weight.device
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    max_seq_len = max_seq_len or longest + max_new_tokens
    if longest >= max_seq_len:
        raise ValueError(f"prompt of {longest} tokens leaves no room in a context of {max_seq_len}")
    for p in prompts:
        if max(p) >= model.cfg.vocab_size or min(p) < 0:
            raise ValueError(f"token id out of range for a vocabulary of {model.cfg.vocab_size}")
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    penalty = sampling.repetition_penalty

    def penalize(rows: torch.Tensor, drafts: Sequence[int]) -> torch.Tensor:  # a verification's (k+1, V) logits
        return apply_repetition_penalty(rows, seen_after(seen[0], drafts), penalty)

    check_kv_cache(model.cfg, B, max_seq_len, KVCache.bytes_per_value(model.cache_dtype, model.cfg.head_dim))
    model.setup_cache(B, max_seq_len)
    try:
        if speculate is not None:
            speculate.start(model, 1, max_seq_len)
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        logits = torch.empty(B, model.cfg.vocab_size, device=device)
        history = [list(p) for p in prompts]  # every row's tokens so far: for a re-prefill, and the drafter's context
        for b, p in enumerate(prompts):
            prompt = torch.tensor(list(p), dtype=torch.long, device=device)
            seen[b, prompt] = True
            logits[b] = prefill(model, prompt, b).float()
        pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)  # of each row's next token
        done = torch.zeros(B, dtype=torch.bool, device=device)
        emitted = 0
        new = None  # the tokens a speculative step decided (B == 1), else one token per row is sampled from logits
        while True:
            if new is None:
                steps = [sample(apply_repetition_penalty(logits, seen, penalty), sampling, gen)]
            else:
                steps = [torch.tensor([t], device=device) for t in new]
            for tok in steps:  # (B,) each
                seen[torch.arange(B), tok] = True
                yield [None if d else t for d, t in zip(done.tolist(), tok.tolist())]
                emitted += 1
                done |= torch.isin(tok, stop) | (pos >= max_seq_len)  # no cache slot left to decode tok
                if bool(done.all()) or emitted == max_new_tokens:
                    return
                for b in torch.nonzero(~done).flatten().tolist():
                    history[b].append(int(tok[b]))
                pos = torch.where(done, pos, pos + 1)
            last = pos - 1  # where each row's last token goes (finished rows: a harmless dummy step there)
            # a row crossing the LongRoPE switch point is run again from position 0 with the long factors
            crossing = ~done & (model.rope.use_long(last[:, None]) != model.cache_rope_long)
            fresh = {b: prefill(model, torch.tensor(history[b], device=device), b).float()
                     for b in torch.nonzero(crossing).flatten().tolist()}
            new = None
            if speculate is not None and not fresh:  # drafts verified in one call, or None: a plain step
                new = speculate.step(model, 0, history[0], max_new_tokens - emitted, max_seq_len, penalize, sampling,
                                     gen)
            if new is None:
                logits = decode_fn(model, tok, last).float()
                for b, row_logits in fresh.items():
                    logits[b] = row_logits
    finally:
        model.remove_cache()
        if speculate is not None:
            speculate.stop()


def stream_text(model: Phi3, tokenizer: Tokenizer, prompt_ids: Sequence[int], max_new_tokens: int,
                sampling: Sampling | None = None, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                max_seq_len: int | None = None, stats: dict | None = None, decode_fn=decode_one,
                speculate=None, show_special: bool = False) -> Iterator[str]:
    """Yield the completion of one prompt as text pieces; stop ids and stop strings are not included.

    Text that could be the start of a stop string is held back until it is ruled out. If `stats` is
    a dict, it receives prompt_tokens, completion_tokens and finish_reason ("stop" or "length").
    Special tokens (the tokenizer's control tokens, e.g. <|endoftext|> or <|im_start|>) that are not stop
    ids produce no text unless show_special, as with llama.cpp and transformers' skip_special_tokens.
    `speculate` is generate()'s.
    """
    decoder = tokenizer.stream(skip_special_tokens=not show_special)
    stop_ids = set(stop_ids)
    pending = ""
    n = 0
    finish = "length"
    hit = -1
    for (tok,) in generate(model, [prompt_ids], max_new_tokens, sampling, stop_ids, max_seq_len, decode_fn, speculate):
        if tok is None:
            break
        n += 1
        if tok in stop_ids:
            finish = "stop"
            break
        pending += decoder.step(tok)
        hit = _find_stop(pending, stop_strings)
        if hit >= 0:
            break
        keep = _partial_stop_len(pending, stop_strings)
        if len(pending) > keep:
            yield pending[:len(pending) - keep]
            pending = pending[len(pending) - keep:]
    if hit < 0:  # the decoder may still hold text (trailing byte tokens), which may finish a stop string
        pending += decoder.flush()
        hit = _find_stop(pending, stop_strings)
    if hit >= 0:
        pending, finish = pending[:hit], "stop"
    if pending:
        yield pending
    if stats is not None:
        stats.update(prompt_tokens=len(prompt_ids), completion_tokens=n, finish_reason=finish)


def _find_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    return min((text.find(s) for s in stop_strings if s and s in text), default=-1)


def _partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
