"""Sampling, generate() and stream_text(), with transformers' logits processors as the reference."""

import pytest
import tiny_tokenizer
import torch
from tiny import VOCAB, tiny_config, write_checkpoint

from phikit.generate import Sampling, _partial_stop_len, apply_repetition_penalty, generate, sample, stream_text
from phikit.model import Phi3
from phikit.tokenizer import Tokenizer

PHI3_MINI = "phi-3-mini-4k-instruct"  # SentencePiece-style, byte fallback
PHI4_MINI = "phi-4-mini-instruct"     # byte-level BPE
P0, P1 = [5, 17, 300, 42], [9, 8, 7, 250, 251, 252, 3]
SAMPLED = Sampling(temperature=1.0, seed=0)  # the tiny model's distribution is near-flat: every step differs

FILTERS = [  # Sampling kwargs for the filtering tests
    dict(top_k=1), dict(top_k=5), dict(top_k=40),
    dict(top_p=0.1), dict(top_p=0.5), dict(top_p=0.9),
    dict(min_p=0.05), dict(min_p=0.2), dict(min_p=0.5),
    dict(top_k=20, top_p=0.8),
    dict(top_p=0.75, min_p=0.3),
    dict(top_k=30, top_p=0.9, min_p=0.1, temperature=0.7),
    dict(top_p=0.6, temperature=1.5),
]


@pytest.fixture(scope="module")
def model():
    m = Phi3(tiny_config("phi-4-mini-instruct"))
    m.init_weights(0)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: Tokenizer(tiny_tokenizer.build(name, root / name)) for name in (PHI3_MINI, PHI4_MINI)}


def _random_logits(B: int, V: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale


def _our_kept(logits: torch.Tensor, s: Sampling, monkeypatch) -> torch.Tensor:
    """(B, V) bool: the tokens sample() gives non-zero probability (the probs it hands to torch.multinomial)."""
    seen = []

    def multinomial(probs, num_samples, generator=None):
        seen.append(probs.clone())
        return probs.argmax(dim=-1, keepdim=True)

    with monkeypatch.context() as m:
        m.setattr(torch, "multinomial", multinomial)
        sample(logits, s)
    return seen[0] > 0


def _hf_kept(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The same set from transformers' warpers, in the order `generate()` chains them."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    warpers = [TemperatureLogitsWarper(s.temperature)]
    if s.top_k > 0:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
        warpers.append(TopPLogitsWarper(s.top_p))
    if s.min_p > 0:
        warpers.append(MinPLogitsWarper(s.min_p))
    scores = logits.float().clone()
    for w in warpers:
        scores = w(None, scores)
    return torch.isfinite(scores)


def _reference_kept(row: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """Plain-Python filtering of one logits row: top-k, then top-p, then min-p."""
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))
    kept = order[:top_k] if top_k else order
    probs = dict(zip(kept, torch.softmax(row[kept].double() / temperature, dim=0).tolist()))
    mass, nucleus = 0.0, []
    for i in kept:  # most likely first: keep while the mass before the token is under top_p
        if mass < top_p:
            nucleus.append(i)
        mass += probs[i]
    p_max = probs[kept[0]]
    return {i for i in nucleus if probs[i] >= min_p * p_max}


# --- sample() ---------------------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    logits = _random_logits(8, 100, seed=0)
    assert torch.equal(sample(logits, Sampling()), logits.argmax(-1))
    assert torch.equal(sample(logits.half(), Sampling(top_k=3)), logits.half().float().argmax(-1))


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)])
def test_filters_at_their_limit_are_greedy(kw):
    """At temperature 1 these keep only the argmax; without the filter 20 draws would almost surely differ."""
    logits = _random_logits(8, 100, seed=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample(logits, Sampling(temperature=1.0, **kw), gen), logits.argmax(-1))
    unfiltered = torch.stack([sample(logits, Sampling(temperature=1.0), gen) for _ in range(20)])
    assert not (unfiltered == logits.argmax(-1)).all()


def test_seeds():
    flat = torch.zeros(16, 1000)
    s = Sampling(temperature=1.0)

    def draw(seed):
        return sample(flat, s, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))  # equal with probability 1e-48


def test_generate_seeds(model):
    def run(seed):
        return list(generate(model, [P0], 8, Sampling(temperature=1.0, seed=seed)))

    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("kw", FILTERS)
def test_sampled_tokens_stay_in_the_kept_set(kw):
    """4000 draws from a fixed distribution land on the kept set, at about the kept probabilities."""
    row = torch.linspace(3, -3, 30)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    s = Sampling(**{"temperature": 1.0, **kw})
    want = _reference_kept(row, s.temperature, s.top_k, s.top_p, s.min_p)
    draws = sample(row.expand(4000, 30), s, torch.Generator().manual_seed(1))
    kept = sorted(want)
    p = torch.softmax(row[kept].double() / s.temperature, dim=0)
    likely = {i for i, pi in zip(kept, p.tolist()) if pi > 0.005}  # each missed with probability < 2e-9
    assert likely <= set(draws.tolist()) <= want
    freq = torch.bincount(draws, minlength=30)[kept].double() / 4000
    assert (freq - p).abs().max() < 0.03  # ~5 standard deviations


@pytest.mark.parametrize("kw", FILTERS)
def test_kept_set_matches_transformers(kw, monkeypatch):
    s = Sampling(**{"temperature": 1.0, **kw})
    logits = _random_logits(64, 64, seed=len(str(kw)))
    ours, theirs = _our_kept(logits, s, monkeypatch), _hf_kept(logits, s)
    assert torch.equal(ours, theirs), (ours != theirs).nonzero()[:5]
    if not (kw.get("top_k") == 1):
        assert (ours.sum(-1) > 1).any()  # a real filter, not greedy


def test_filters_apply_in_transformers_order(monkeypatch):
    """top-k, then top-p, then min-p (transformers' `_get_logits_processor` order).

    p = (0.4, 0.3, 0.2, 0.1), top_p 0.75, min_p 0.3: top-p keeps the first three (mass before them
    0, 0.4, 0.7 < 0.75) and min-p keeps p >= 0.12 of those: {0, 1, 2}. Min-p first would keep the
    same three, renormalise to (0.44, 0.33, 0.22) and let top-p drop the third (0.78 >= 0.75).
    """
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    kept = _our_kept(logits, Sampling(temperature=1.0, top_p=0.75, min_p=0.3), monkeypatch)
    assert kept.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\)"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be > 0"),
])
def test_invalid_sampling(kw, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kw)


# --- repetition penalty -----------------------------------------------------------------------------

@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _random_logits(4, 50, seed=2, scale=3.0)
    logits[:, :5] = 0.0
    input_ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(3))
    input_ids[:, 0] = 2  # a zero logit among the seen tokens
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter(1, input_ids, True)
    want = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    got = apply_repetition_penalty(logits, seen, penalty)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got == logits, ~seen | (logits == 0) | (penalty == 1.0))


def test_generate_with_repetition_penalty_matches_transformers(tmp_path):
    """Greedy with penalty 1.5: the penalty covers the prompt and every generated token (HF semantics)."""
    from phikit.checkpoint import load_model

    hf = write_checkpoint(tiny_config("phi-3-mini-4k-instruct"), tmp_path)
    ours = load_model(tmp_path)
    prompt = torch.tensor([P1])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=24, do_sample=False, repetition_penalty=1.5,
                           pad_token_id=0)[0, prompt.shape[1]:].tolist()
    got = [t for (t,) in generate(ours, [P1], 24, Sampling(repetition_penalty=1.5))]
    assert got == want
    assert got != [t for (t,) in generate(ours, [P1], 24)]  # the penalty changed something


# --- generate() -------------------------------------------------------------------------------------

def _first_new(seq, start):
    """First index >= start whose token does not occur earlier in seq."""
    return next(k for k in range(start, len(seq)) if seq[k] not in seq[:k])


def test_generate_stops_after_stop_id(model):
    free = [t for (t,) in generate(model, [P0], 20, SAMPLED)]
    k = _first_new(free, 5)
    got = [t for (t,) in generate(model, [P0], 20, SAMPLED, stop_ids=[free[k], VOCAB + 7])]
    assert got == free[:k + 1]  # the stop id is yielded, then the sequence ends


@pytest.mark.parametrize("n", [1, 5, 17])
def test_max_new_tokens(model, n):
    steps = list(generate(model, [P0, P1], n))
    assert len(steps) == n and all(None not in step for step in steps)
    assert list(generate(model, [P0], 0)) == []


def test_rows_finish_independently(model):
    """A finished row yields None; the other row's tokens are those of the run without the stop."""
    N = 20
    free = list(generate(model, [P0, P1], N, SAMPLED))
    row0, row1 = [s[0] for s in free], [s[1] for s in free]
    k0 = next(k for k in range(4, N) if row0[k] not in row0[:k] and row0[k] not in row1)
    got = list(generate(model, [P0, P1], N, SAMPLED, stop_ids=[row0[k0]]))
    assert [s[0] for s in got] == row0[:k0 + 1] + [None] * (N - k0 - 1)
    assert [s[1] for s in got] == row1

    k1 = next(k for k in range(k0 + 3, N) if row1[k] not in row1[:k] + row0[:k0 + 1])
    got = list(generate(model, [P0, P1], N, SAMPLED, stop_ids=[row0[k0], row1[k1]]))
    assert len(got) == k1 + 1  # ends when the last row stops
    assert [s[0] for s in got] == row0[:k0 + 1] + [None] * (k1 - k0)
    assert [s[1] for s in got] == row1[:k1 + 1]


@pytest.mark.parametrize("prompts", [[], [[]], [P0, []], [[1, VOCAB]], [[-1, 3]]])
def test_bad_prompts(model, prompts):
    with pytest.raises(ValueError, match="at least one token|out of range"):
        list(generate(model, prompts, 4))


# --- stream_text() ----------------------------------------------------------------------------------

def _is_byte(tok: Tokenizer, i: int) -> bool:
    t = tok.id_to_token(i) or ""
    return t.startswith("<0x") and len(t) == 6


@pytest.mark.parametrize("show_special", [False, True])
@pytest.mark.parametrize("name", [PHI3_MINI, PHI4_MINI])
def test_stream_text_length(model, tokenizers, name, show_special):
    """The text is decode(ids): special tokens that are not stop ids are left out unless show_special."""
    tok, s = tokenizers[name], Sampling(temperature=1.0, seed=1)
    ids = [t for (t,) in generate(model, [P0], 24, s)]
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    assert bool(specials & set(ids)) == (name == PHI3_MINI)  # two of them in the Phi-3 vocabulary
    stats = {}
    pieces = list(stream_text(model, tok, P0, 24, s, stats=stats, show_special=show_special))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=not show_special) and len(pieces) > 5
    assert stats == dict(prompt_tokens=len(P0), completion_tokens=24, finish_reason="length")


@pytest.mark.parametrize("name", [PHI3_MINI, PHI4_MINI])
def test_stream_text_stop_id(model, tokenizers, name):
    """Stop at every token that is new at its step: the text is decode(ids before the stop)."""
    tok = tokenizers[name]
    ids = [t for (t,) in generate(model, [P0], 24, SAMPLED)]
    ks = [k for k in range(len(ids)) if ids[k] not in ids[:k]]
    if name == PHI3_MINI:  # includes stops right after byte-fallback tokens the decoder still holds
        assert any(_is_byte(tok, ids[k - 1]) for k in ks if k > 0)
    for k in ks:
        stats = {}
        text = "".join(stream_text(model, tok, P0, 24, SAMPLED, stop_ids=[ids[k]], stats=stats, show_special=True))
        assert text == tok.decode(ids[:k]), k
        assert stats == dict(prompt_tokens=len(P0), completion_tokens=k + 1, finish_reason="stop")


@pytest.mark.parametrize("name", [PHI3_MINI, PHI4_MINI])
def test_stream_text_stop_strings(model, tokenizers, name):
    tok = tokenizers[name]
    N = 24
    ids = [t for (t,) in generate(model, [P0], N, SAMPLED)]
    full = tok.decode(ids)
    for a in range(2, len(full) - 4, max(1, len(full) // 6)):
        stop = full[a:a + 3]
        cut = full.find(stop)
        decoder, streamed, n = tok.stream(), "", 0  # tokens read until the streamed text shows the stop
        while stop not in streamed and n < N:
            streamed += decoder.step(ids[n])
            n += 1
        assert stop in tok.decode(ids[:n])
        stats = {}
        text = "".join(stream_text(model, tok, P0, N, SAMPLED, stop_strings=["\x00never", stop], stats=stats,
                                   show_special=True))
        assert text == full[:cut], stop
        assert stats == dict(prompt_tokens=len(P0), completion_tokens=n, finish_reason="stop")
    # the earliest of several stop strings wins
    late, early = full[-3:], full[3:6]
    text = "".join(stream_text(model, tok, P0, N, SAMPLED, stop_strings=[late, early], show_special=True))
    assert text == full[:full.find(early)]


def test_stream_text_stop_string_completed_at_flush(model, tokenizers):
    """A stop string finished by byte-fallback tokens held back until the end still stops the text."""
    tok = tokenizers[PHI3_MINI]
    free = [t for (t,) in generate(model, [P0], 40, SAMPLED)]
    N = max(n for n in range(2, 41) if _is_byte(tok, free[n - 1]) and not _is_byte(tok, free[n - 2]))
    full = tok.decode(free[:N])
    stop = next(full[-k:] for k in range(1, len(full)) if full.find(full[-k:]) == len(full) - k)
    stats = {}
    text = "".join(stream_text(model, tok, P0, N, SAMPLED, stop_strings=[stop], stats=stats, show_special=True))
    assert text == full[:len(full) - len(stop)]
    assert stats == dict(prompt_tokens=len(P0), completion_tokens=N, finish_reason="stop")


@pytest.mark.parametrize("text, stops, want", [
    ("Hello <", ["<|end|>"], 1),
    ("Hello <|en", ["<|end|>"], 4),
    ("Hello <|end|>", ["<|end|>"], 0),   # a whole stop string is found, not held back
    ("abc", ["bcd"], 2),
    ("abc", ["abc"], 0),
    ("xyzab", ["abc", "zabq"], 3),       # the longest over all stop strings
    ("xyzab", ["zabq", "abc"], 3),
    ("aaa", ["aab"], 2),
    ("", ["abc"], 0),
    ("abc", [], 0),
    ("abc", [""], 0),
    ("ab", ["abcdef"], 2),
    ("ab", ["b", "bc"], 1),
])
def test_partial_stop_len(text, stops, want):
    assert _partial_stop_len(text, stops) == want


@pytest.mark.parametrize("preset", ["phi-4-mini-instruct", "phi-3-mini-4k-instruct"])  # LongRoPE; sliding window
@pytest.mark.parametrize("dtype, kv", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.int8)])
def test_chunked_prefill_equals_one_call(preset, dtype, kv):
    """A prompt prefilled in chunks (here 5, 16 or 36 tokens, the last of 1; 256 by default) gives the
    logits and the cache of one call, across the LongRoPE switch point (16) and the sliding window (11):
    the first chunks already use the factor list the whole prompt needs (float32 catches a chunk on the
    short list: 4e-4 off; bf16 rounding alone is 2e-3)."""
    from phikit.generate import prefill

    m = Phi3(tiny_config(preset))
    m.init_weights(0)
    m = m.eval().to(dtype)
    prompt = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(2))
    runs = []
    for chunk in (512, 5, 16, 36):
        m.setup_cache(2, 64, kv)
        logits = prefill(m, prompt, 1, chunk=chunk)
        cache = m.layers[-1].self_attn.kv_cache
        runs.append((logits, cache.k[1, :, :37].float(), cache.v[1, :, :37].float(), m.cache_rope_long.clone()))
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            # int8 cache codes: a value on a rounding edge may move by one code
            torch.testing.assert_close(a, b, rtol=0, atol=1 if kv is not None and i in (1, 2) else atol)
    assert bool(runs[0][3][1]) == m.cfg.longrope  # 37 > 16: the long list, where the preset has one
    with pytest.raises(ValueError, match="chunk"):
        prefill(m, prompt, 0, chunk=0)
    m.setup_cache(2, 30)
    with pytest.raises(ValueError, match="beyond the cache size"):  # refused before writing anything
        prefill(m, prompt, 0, chunk=5)
    assert m.layers[0].self_attn.kv_cache.zeroed == 0


def test_chunked_prefill_of_a_sequence_crossing_the_longrope_switch(model, monkeypatch):
    """A 12-token prompt grows past the switch point (16) while decoding: generate() re-prefills it (then 17
    tokens, in chunks of 3) with the long factors; the tokens equal those of unchunked prefills."""
    import functools
    import sys

    module = sys.modules["phikit.generate"]
    prompt = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    whole = list(generate(model, [prompt], 10))
    monkeypatch.setattr(module, "prefill", functools.partial(module.prefill, chunk=3))
    assert list(generate(model, [prompt], 10)) == whole


def test_generate_with_a_prompt_longer_than_the_prefill_chunk(model, monkeypatch):
    """generate() output does not depend on the prefill chunk size."""
    import functools
    import sys

    module = sys.modules["phikit.generate"]  # (phikit.generate, the attribute, is the function)
    prompt = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = list(generate(model, [prompt, P0], 12))
    monkeypatch.setattr(module, "prefill", functools.partial(module.prefill, chunk=7))
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    try:
        assert list(generate(model, [prompt, P0], 12)) == whole
    finally:
        hook.remove()
    assert calls[:7] == [7, 7, 7, 7, 7, 5, 4]  # the 40-token prompt in chunks of 7, then the 4-token one
