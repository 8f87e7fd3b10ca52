"""Speculative decoding (phikit/speculate.py): lossless against plain decoding, on tiny random models.

Greedy: token-identical to plain greedy with every drafter (prompt lookup, a different random model, a
noisy copy of the model, the model itself, and an oracle that plants errors at chosen offsets), across the
LongRoPE switch point (original_max_seq_len 16), with the int8 KV cache, with stop ids and max_new_tokens
hitting in the middle of a draft. Sampling: chi-square of the first tokens' distribution against the exact
plain one on a vocabulary of 8, with a bound that the wrong acceptance rules exceed.
"""

import copy

import pytest
import torch
from tiny import VOCAB, tiny_config, write_checkpoint
from tiny_tokenizer import build

import phikit.speculate as speculate_module
from phikit.fused_decode import fused_decoder
from phikit.generate import Sampling, apply_repetition_penalty, decode_one, generate, prefill, probs, stream_text
from phikit.model import Phi3
from phikit.quantize import quantize_model
from phikit.speculate import DraftModel, Drafter, PromptLookup, accept, draft_mismatch, verify
from phikit.tokenizer import Tokenizer

PRESET = "phi-4-mini-instruct"  # LongRoPE (switch at 16 in the tiny config), GQA, partial rotary


def random_model(seed: int, preset: str = PRESET, std: float = 0.2, **overrides) -> Phi3:
    """A tiny model with N(0, std) matrices (std 0.2: peaked enough that greedy does not tie), norms in [0.5, 1.5]."""
    m = Phi3(tiny_config(preset, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std if p.dim() > 1 else torch.rand(p.shape, generator=g) + 0.5)
    return m.eval()


def noisy_copy(m: Phi3, noise: float, seed: int = 5) -> Phi3:
    """m with N(0, noise) added to every matrix: a draft model that agrees with m often, not always."""
    d = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return d


def chain_model(seed: int = 0) -> tuple[Phi3, list[int]]:
    """A model whose greedy next token after a is (mostly) succ[a], a random permutation: the embedding feeds the
    output layer through the residual stream, attention and MLP add a small (0.01-scaled) part. Output that
    follows a chain given in the prompt is what prompt lookup drafts."""
    m = random_model(seed, tie_embeddings=False)  # the output layer is set apart from the embedding
    g = torch.Generator().manual_seed(seed + 1)
    succ = torch.randperm(VOCAB, generator=g)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.01)
        E = torch.randn(VOCAB, m.cfg.dim, generator=g)
        m.embed_tokens.weight.copy_(E)
        m.norm.weight.fill_(1.0)
        head = torch.empty_like(E)
        head[succ] = E * (6 / m.cfg.dim)  # logit of succ[a] after a: ~6; the others ~N(0, 0.9)
        m.lm_head.weight.copy_(head)
    return m, succ.tolist()


def plain(m, prompt, n, **kw):
    return [t for (t,) in generate(m, [prompt], n, **kw)]


class Oracle(Drafter):
    """Drafts the plain greedy continuation, wrong at the given output offsets (a test double for a drafter)."""

    name, k = "oracle", 5

    def __init__(self, prompt_len: int, truth: list[int], wrong: set[int], vocab: int):
        super().__init__()
        self.prompt_len, self.truth, self.wrong, self.vocab = prompt_len, truth, wrong, vocab

    def propose(self, row, context, k, sampling, generator=None):
        i = len(context) - self.prompt_len  # offset in the output of the first drafted token
        out = [(t + 1) % self.vocab if i + j in self.wrong else t for j, t in enumerate(self.truth[i:i + k])]
        return out, None


PROMPT = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def model():
    return random_model(0)


@pytest.fixture(scope="module")
def chain():
    return chain_model()


def _drafters(name, m):
    """A fresh drafter of each kind for model m."""
    return {"prompt-lookup": lambda: PromptLookup(),
            "other-model": lambda: DraftModel(random_model(1)),
            "noisy-copy": lambda: DraftModel(noisy_copy(m, 0.05)),
            "itself": lambda: DraftModel(copy.deepcopy(m))}[name]()


# --- prompt lookup's proposals ----------------------------------------------------------------------

def test_prompt_lookup_proposals():
    pl = PromptLookup(k=3, max_ngram=3, min_ngram=2)
    s = Sampling()
    assert pl.propose(0, [1, 2, 3, 4, 1, 2], 3, s) == ([3, 4, 1], None)
    assert pl.propose(0, [1, 2, 3, 4, 1, 2], 1, s) == ([3], None)
    # the latest earlier occurrence wins; a longer n-gram before a shorter one
    assert pl.propose(1, [1, 2, 5, 9, 1, 2, 6, 9, 7, 1, 2], 2, s) == ([6, 9], None)
    assert pl.propose(2, [7, 1, 2, 5, 8, 1, 2, 6, 7, 1, 2], 2, s) == ([5, 8], None)  # (7, 1, 2) beats (1, 2)
    # a run that reaches the end of the context goes on repeating
    assert pl.propose(3, [4, 4, 4], 4, s) == ([4, 4, 4, 4], None)
    assert pl.propose(4, [1, 2, 3, 1, 2], 5, s) == ([3, 1, 2, 3, 1], None)
    # no earlier occurrence of the last two tokens: no draft (min_ngram 2: a single token is not enough)
    assert pl.propose(5, [1, 2, 3, 4, 3, 5], 3, s) == ([], None)
    assert PromptLookup(min_ngram=1).propose(5, [1, 2, 3, 4, 3, 5], 3, s) == ([], None)
    assert PromptLookup(min_ngram=1).propose(5, [1, 2, 3, 4, 2], 3, s) == ([3, 4, 2], None)
    # a row's index follows its context, and is rebuilt when the row holds another sequence
    assert pl.propose(0, [1, 2, 3, 4, 1, 2, 3, 9, 1, 2], 2, s) == ([3, 9], None)
    assert pl.propose(0, [8, 9, 8], 2, s) == ([], None)
    assert pl.propose(0, [8, 9, 5, 8, 9], 2, s) == ([5, 8], None)
    # the defaults: n = 4 down to 3
    assert PromptLookup().propose(0, [1, 2, 3, 9, 2, 3], 4, s) == ([], None)
    assert PromptLookup().propose(0, [1, 2, 3, 9, 1, 2, 3], 4, s) == ([9, 1, 2, 3], None)


# --- greedy: token for token plain greedy -----------------------------------------------------------

@pytest.mark.parametrize("kv", [None, torch.int8])
@pytest.mark.parametrize("name", ["prompt-lookup", "other-model", "noisy-copy", "itself"])
def test_greedy_equals_plain_across_the_longrope_switch(model, name, kv):
    """A 12-token prompt and 30 new tokens cross original_max_seq_len (16): drafts are cut before it, the
    crossing step re-prefills, and the tokens are plain greedy's; the model as its own draft accepts all."""
    model.kv_cache_dtype = kv
    try:
        want = plain(model, PROMPT, 30)
        drafter = _drafters(name, model)
        if isinstance(drafter, DraftModel):
            drafter.model.kv_cache_dtype = kv
        assert plain(model, PROMPT, 30, speculate=drafter) == want
    finally:
        model.kv_cache_dtype = None
    if name == "itself":
        assert drafter.accepted == drafter.drafted > 20
    if name == "noisy-copy":
        assert 0 < drafter.accepted < drafter.drafted  # both outcomes happened


def _quantized(preset: str, kv) -> Phi3:
    m = random_model(0, preset)
    quantize_model(m, bits=4, group_size=32)
    m.kv_cache_dtype = kv
    return m


@pytest.mark.parametrize("path", ["fused", "eager"])
@pytest.mark.parametrize("kv", [None, torch.int8])
@pytest.mark.parametrize("preset", [PRESET, "phi-3-mini-4k-instruct"])
def test_verify_is_decode_steps_bit_for_bit(preset, kv, path):
    """On an int4 model (whose kernels round each row alike for any row count), verify() of 4 drafts gives
    the logits and the cache of 5 decode steps exactly: through the fused decoder and through the eager
    step (a float32 GEMM may round a 5-row product otherwise than a 1-row one: 1e-5 here)."""
    m = _quantized(preset, kv)
    drafts = [7, 8, 9, 10]
    m.setup_cache(1, 64)
    prefill(m, torch.tensor(PROMPT), 0)
    want = torch.stack([decode_one(m, torch.tensor([t]), torch.tensor([len(PROMPT) - 1 + j]))[0].float()
                        for j, t in enumerate([PROMPT[-1], *drafts])])
    cache = m.layers[-1].self_attn.kv_cache
    want_k, want_v = cache.k[0, :, :len(PROMPT) + 4].clone(), cache.v[0, :, :len(PROMPT) + 4].clone()
    m.setup_cache(1, 64)
    prefill(m, torch.tensor(PROMPT), 0)
    if path == "fused":
        assert fused_decoder(m) is not None
        got = verify(m, 0, PROMPT, drafts)
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(speculate_module, "fused_decoder", lambda model: None)
            got = verify(m, 0, PROMPT, drafts)
    cache = m.layers[-1].self_attn.kv_cache
    assert torch.equal(got, want)
    assert torch.equal(cache.k[0, :, :len(PROMPT) + 4], want_k) and torch.equal(cache.v[0, :, :len(PROMPT) + 4], want_v)


@pytest.mark.parametrize("kv", [None, torch.int8])
def test_greedy_equals_plain_on_an_int4_model(kv):
    """The int4 model as its own draft (all accepted) and an oracle with wrong drafts (rejections)."""
    m = _quantized(PRESET, kv)
    want = plain(m, PROMPT, 30)
    itself, oracle = DraftModel(copy.deepcopy(m)), Oracle(len(PROMPT), want, {2, 9, 10, 20}, VOCAB)
    assert plain(m, PROMPT, 30, speculate=itself) == want == plain(m, PROMPT, 30, speculate=oracle)
    assert itself.accepted == itself.drafted > 20 and 0 < oracle.accepted < oracle.drafted


@pytest.mark.parametrize("kv", [None, torch.int8])
def test_greedy_with_rejections_at_every_offset_of_a_draft(model, kv):
    """An oracle drafter wrong at output offsets 3, 5, 6 and 13: rejections at draft offsets 0..4 roll
    the cache back; the output is plain greedy's and the accepted count is the oracle's right drafts."""
    model.kv_cache_dtype = kv
    try:
        want = plain(model, PROMPT, 24)
        oracle = Oracle(len(PROMPT), want, {3, 5, 6, 13}, VOCAB)
        assert plain(model, PROMPT, 24, speculate=oracle) == want
    finally:
        model.kv_cache_dtype = None
    assert 0 < oracle.accepted < oracle.drafted


def test_prompt_lookup_accepts_copied_chains(chain):
    """On the chain model, a prompt holding a chain with one wrong link: drafts are accepted up to the wrong
    link, rejected there, and taken up again after it; the output is plain greedy's, also past 16 tokens."""
    m, succ = chain
    x = [3]
    for _ in range(9):
        x.append(succ[x[-1]])
    planted = x[:6] + [(x[6] + 1) % VOCAB] + x[7:]  # link 6 is wrong
    prompt = planted + [x[0]]
    want = plain(m, prompt, 24)
    assert want[:8] == x[1:9]  # the model follows the chain, not the prompt's wrong link
    pl = PromptLookup(k=4, max_ngram=3, min_ngram=2)
    assert plain(m, prompt, 24, speculate=pl) == want
    assert pl.accepted >= 5 and pl.drafted > pl.accepted


def test_stop_ids_and_max_new_tokens_inside_a_draft(model):
    """The model as its own draft accepts 4 tokens a step: a stop id or the token limit that falls inside
    a step ends the output exactly there, and so does the end of the cache (max_seq_len)."""
    free = plain(model, PROMPT, 24)
    drafter = DraftModel(copy.deepcopy(model))
    for n in range(1, 12):
        assert plain(model, PROMPT, n, speculate=drafter) == free[:n]
    for k in [k for k in range(1, 12) if free[k] not in free[:k]]:
        assert plain(model, PROMPT, 24, stop_ids=[free[k]], speculate=drafter) == free[:k + 1]
    for room in (1, 3, 6):
        limited = plain(model, PROMPT, 24, max_seq_len=len(PROMPT) + room)
        assert plain(model, PROMPT, 24, max_seq_len=len(PROMPT) + room, speculate=drafter) == limited
        assert len(limited) == room + 1  # the last token has no cache slot left: it ends the sequence


def test_stream_text_passes_the_drafter(model, tmp_path):
    tok = Tokenizer(build(PRESET, tmp_path))
    want = "".join(stream_text(model, tok, PROMPT, 20, show_special=True))
    drafter = DraftModel(noisy_copy(model, 0.05))
    assert "".join(stream_text(model, tok, PROMPT, 20, speculate=drafter, show_special=True)) == want
    assert drafter.verified > 0


def test_refusals(model):
    with pytest.raises(ValueError, match="one sequence at a time"):
        list(generate(model, [PROMPT, PROMPT], 4, speculate=PromptLookup()))
    with pytest.raises(ValueError, match="the model itself"):
        list(generate(model, [PROMPT], 4, speculate=DraftModel(model)))
    with pytest.raises(ValueError, match="vocabulary has 300 ids"):
        list(generate(model, [PROMPT], 4, speculate=DraftModel(random_model(1, vocab_size=300))))
    assert model.cache_rope_long is None  # the cache is gone after a refusal too


# --- sampling: the plain distribution ---------------------------------------------------------------

V8 = 8
PROMPT8 = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]  # every token occurs: prompt lookup (min_ngram=1) always drafts
SAMPLING = Sampling(temperature=0.9, top_k=6, repetition_penalty=1.3)


def _exact(m: Phi3, prompt: list[int], s: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain sampling's exact P(t1, t2) (V, V) and P(t3) (V,), from full forwards (no cache) of every prefix."""
    V = m.cfg.vocab_size

    def step(prefixes: torch.Tensor) -> torch.Tensor:  # (N, T) -> (N, V): the next token's distribution
        with torch.no_grad():
            logits = m(prefixes)[:, -1].float()
        seen = torch.zeros(len(prefixes), V, dtype=torch.bool).scatter(1, prefixes, True)
        return probs(apply_repetition_penalty(logits, seen, s.repetition_penalty), s)

    base = torch.tensor(prompt)
    p1 = step(base[None])[0]
    ones = torch.cat([base.expand(V, -1), torch.arange(V)[:, None]], 1)  # (V, T+1)
    joint = p1[:, None] * step(ones)  # (V, V)
    twos = torch.cat([ones.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)  # (V*V, T+2)
    p3 = (joint.reshape(-1, 1) * step(twos)).sum(0)
    return joint.double(), p3.double()


def _chi_square(counts: torch.Tensor, expected_p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells with an expected count under 5 pooled into one."""
    n = counts.sum()
    e, c = (expected_p.flatten() * n), counts.flatten().double()
    small = e < 5
    e = torch.cat([e[~small], e[small].sum()[None]])
    c = torch.cat([c[~small], c[small].sum()[None]])
    keep = e > 0
    assert c[~keep].sum() == 0, "a token plain sampling never gives"
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def _sampled(m: Phi3, drafter, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of (t1, t2) and of t3 over n seeded runs."""
    joint, third = torch.zeros(V8, V8), torch.zeros(V8)
    for seed in range(n):
        s = Sampling(**{**SAMPLING.__dict__, "seed": seed})
        t1, t2, t3 = plain(m, PROMPT8, 3, sampling=s, speculate=drafter)
        joint[t1, t2] += 1
        third[t3] += 1
    return joint, third


def _passes(m, drafter, n=300) -> bool:
    """Both chi-squares under df + 5 sqrt(2 df) (one-sided p ~ 1e-5 at these df)."""
    joint, p3 = _exact(m, PROMPT8, SAMPLING)
    counts = _sampled(m, drafter, n)
    for c, p in zip(counts, (joint, p3)):
        stat, df = _chi_square(c, p)
        if stat > df + 5 * (2 * df) ** 0.5:
            return False
    return True


@pytest.fixture(scope="module")
def model8():
    return random_model(0, vocab_size=V8, std=0.3)


@pytest.mark.parametrize("name", ["prompt-lookup", "noisy-copy", "other-model"])
def test_sampling_keeps_the_plain_distribution(model8, name):
    """300 seeded runs of 3 tokens (top-k 6 of 8, temperature 0.9, repetition penalty 1.3): one draft is
    verified at the second token, accepted 10-25% of the time here (plain sampling's own statistics are
    13 and 5 at 17 and 7 degrees of freedom with 400 runs, against bounds of 46 and 26)."""
    drafter = {"prompt-lookup": PromptLookup(k=2, min_ngram=1),
               "noisy-copy": DraftModel(noisy_copy(model8, 0.3)),
               "other-model": DraftModel(random_model(1, vocab_size=V8, std=0.3))}[name]
    assert _passes(model8, drafter)
    assert drafter.accepted > 20 and drafter.drafted - drafter.accepted > 20  # both branches ran


def _accept_all(logits, drafts, q, s, generator=None):
    """The wrong rule: every draft accepted."""
    return drafts + [int(torch.multinomial(probs(logits[-1:], s)[0], 1, generator=generator))]


def _reject_to_p(logits, drafts, q, s, generator=None):
    """The wrong rule: a rejection drawn from p instead of norm(max(0, p - q))."""
    p = probs(logits, s)
    for j, d in enumerate(drafts):
        qd = 1.0 if q is None else float(q[j, d])
        if float(torch.rand(1, generator=generator)) * qd >= float(p[j, d]):
            return drafts[:j] + [int(torch.multinomial(p[j], 1, generator=generator))]
    return drafts + [int(torch.multinomial(p[-1], 1, generator=generator))]


def test_accepting_every_draft_fails_the_bound(model8, monkeypatch):
    """The same test with every draft accepted: chi-square 2779 and 285 (400 runs) against 46 and 26."""
    monkeypatch.setattr(speculate_module, "accept", _accept_all)
    assert not _passes(model8, PromptLookup(k=2, min_ngram=1))


@pytest.mark.parametrize("rule, ok", [(accept, True), (_reject_to_p, False)])
def test_accept_rule_on_fixed_distributions(rule, ok):
    """accept() alone, 4000 draws with p and q fixed over 5 tokens: the first emitted token is distributed as
    p, within 0.04 (5 standard deviations); drawing a rejection from p instead of the residual is 0.16 off
    (computed: p min(1, q/p) + (1 - sum min(p, q)) p). The draft's own q is 0.62 from p in total variation."""
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.05, 0.1, 0.15, 0.3, 0.4]])
    s = Sampling(temperature=1.0)
    p = probs(p_logits[:1], s)[0]
    g = torch.Generator().manual_seed(0)
    first = torch.zeros(5)
    for _ in range(4000):
        d = int(torch.multinomial(q[0], 1, generator=g))
        first[rule(p_logits, [d], q, s, g)[0]] += 1
    assert ((first / 4000 - p).abs().max() < 0.04) == ok
    assert 0.5 * (q[0] - p).abs().sum() > 0.6


# --- draft models with another tokenizer ------------------------------------------------------------

def test_draft_mismatch_names_the_difference(tmp_path, model):
    import json

    a = Tokenizer(build(PRESET, tmp_path / "a"))
    assert draft_mismatch(model, a, random_model(1), Tokenizer(build(PRESET, tmp_path / "a2"))) is None
    other = Tokenizer(build("phi-3-mini-4k-instruct", tmp_path / "b"))
    assert draft_mismatch(model, a, random_model(1), other) == f"{other.vocab_size} tokens against {a.vocab_size}"
    swapped = json.loads((tmp_path / "a" / "tokenizer.json").read_text())  # two ids exchanged, nothing else
    vocab = swapped["model"]["vocab"]
    x, y = sorted(vocab, key=vocab.get)[100:102]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (tmp_path / "a2" / "tokenizer.json").write_text(json.dumps(swapped))
    assert draft_mismatch(model, a, random_model(1), Tokenizer(tmp_path / "a2")) == f"token {x!r} is id 101 against 100"
    assert draft_mismatch(model, a, random_model(1, vocab_size=300), a) == "its embedding has 300 rows, the model's 600"
    assert "cannot be compared" in draft_mismatch(model, a, random_model(1), None)


def test_cli_refuses_a_draft_model_with_another_tokenizer(tmp_path, capsys):
    """phikit generate --draft-model with another tokenizer exits with one line naming both models."""
    from phikit.commands.generate import main

    target, draft = tmp_path / "target", tmp_path / "draft"
    write_checkpoint(tiny_config(PRESET), target)
    build(PRESET, target)
    write_checkpoint(tiny_config("phi-3.5-mini-instruct"), draft, seed=1)
    build("phi-3.5-mini-instruct", draft)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(target), "--draft-model", str(draft), "--prompt", "Hello", "--max-new-tokens", "2"])
    assert str(e.value).startswith(f"phikit: the draft model {draft} has another tokenizer than {target}: ")
    assert "\n" not in str(e.value)
    for bad, message in ((["--speculate", "draft-model"], "--speculate draft-model needs --draft-model M"),
                         (["--speculate", "prompt-lookup", "--draft-model", str(draft)], "choose one"),
                         (["--speculate", "prompt-lookup", "--draft-tokens", "0"], "--draft-tokens must be >= 1")):
        with pytest.raises(SystemExit, match=message):
            main(["--model", str(target), "--prompt", "Hello", "--max-new-tokens", "2", *bad])
    # the same tokenizer: accepted, and --verbose reports the drafts
    build(PRESET, draft)
    assert main(["--model", str(target), "--draft-model", str(draft), "--prompt", "Hello", "--max-new-tokens", "6",
                 "--verbose"]) == 0
    assert "draft-model:" in capsys.readouterr().err


# --- control tokens in raw completions --------------------------------------------------------------

def test_special_tokens_are_hidden_unless_asked(chain, tmp_path):
    """The chain model's greedy output runs through a special token that is not a stop id: stream_text hides
    its text by default and shows it with show_special (the tokenizer's decode with and without skipping)."""
    m, succ = chain
    tok = Tokenizer(build(PRESET, tmp_path))
    special = next(i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special and i < VOCAB)
    start = succ.index(special)  # the token the chain leads from into the special token
    ids = plain(m, [start], 6)
    assert ids[0] == special
    hidden = "".join(stream_text(m, tok, [start], 6))
    shown = "".join(stream_text(m, tok, [start], 6, show_special=True))
    assert hidden == tok.decode(ids, skip_special_tokens=True) and shown == tok.decode(ids)
    assert tok.id_to_token(special) in shown and tok.id_to_token(special) not in hidden
