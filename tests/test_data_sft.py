"""SFT data: golden trained spans per template, errors, the cache, max_len, and losses against transformers
(unpacked) and against the unpacked examples (packed rows, LongRoPE and sliding window presets)."""

import json
import sys

import numpy as np
import pytest
import tiny_tokenizer
import torch
import torch.nn.functional as F
from tiny import ORIG, VOCAB, WINDOW, tiny_config, write_checkpoint
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from phikit.checkpoint import load_model
from phikit.data import sft
from phikit.data.sft import (SFTDataError, collate, end_of_turn_id, epoch_batches, load_sft_dataset, pack,
                             read_rows, tokenize)
from phikit.tokenizer import Tokenizer
from phikit.train.losses import cross_entropy

PHI35, PHI4 = "phi-3.5-mini-instruct", "phi-4-mini-instruct"
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And in code?"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome 🙂"},  # not in the tiny vocabulary: byte fallback on Phi-3
]
# The trained tokens, decoded run by run: each assistant content and the token that ends its turn, nothing else
# (no role marker, no system/user text, no "\n" after <|end|> (Phi-3's <|end|> absorbs it: rstrip), no eos).
GOLDEN_PHI = ["Paris is the capital.<|end|>", "def add(a, b):\n    return a + b<|end|>", "You're welcome 🙂<|end|>"]
GOLDEN_CHATML = [s.replace("<|end|>", "<|im_end|>") for s in GOLDEN_PHI]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """name -> Tokenizer: the tiny Phi tokenizers, and a ChatML one (SmolLM2-like: eos = pad = <|im_end|>)."""
    out = {name: Tokenizer(tiny_tokenizer.build(name, tmp_path_factory.mktemp(name))) for name in tiny_tokenizer.NAMES}
    backend = HFTokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(tiny_tokenizer.CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out["chatml"] = Tokenizer.from_parts(backend, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                   "pad_token": "<|im_end|>", "chat_template": CHATML})
    return out


def runs(targets) -> list[list[int]]:
    """Positions with a trained target, grouped into runs of consecutive positions."""
    out, cur = [], []
    for t, y in enumerate(targets):
        if y != -100:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def trained_text(tok, targets) -> list[str]:
    return [tok.decode([targets[t] for t in r]) for r in runs(targets)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ labels

@pytest.mark.parametrize("name", tiny_tokenizer.NAMES)  # Phi-3-mini (both templates), -medium, 3.5, 4-mini
def test_golden_trained_spans_phi(toks, name):
    tok = toks[name]
    ids, targets = tokenize({"messages": CONVERSATION}, tok)
    assert len(ids) == len(targets) and targets[-1] == -100
    assert trained_text(tok, targets) == GOLDEN_PHI
    end = tok.token_to_id("<|end|>")
    assert end_of_turn_id(tok) == end
    for r in runs(targets):
        assert tok.id_to_token(ids[r[0]]) == "<|assistant|>"  # the last untrained input is the role marker
        assert targets[r[-1]] == end  # each run closes with the end token ...
        assert ids[r[-1] + 1] == end  # ... at the position after the run's last input
    assert tok.eos_id not in targets  # the trailing <|endoftext|> of the Phi-3.x templates is not trained
    assert targets == [ids[t + 1] if y != -100 else -100 for t, y in enumerate(targets[:-1])] + [-100]  # shifted


def test_sentencepiece_and_byte_level_pieces(toks):
    """The exact labelled pieces where the two tokenizer kinds differ: Phi-3's "▁" prefix and byte fallback."""
    tok = toks[PHI35]
    ids, targets = tokenize({"messages": CONVERSATION}, tok)
    pieces = [[tok.id_to_token(targets[t]) for t in r] for r in runs(targets)]
    assert all(p[0].startswith("▁") for p in pieces)  # the normalizer's "▁" maps onto the content's first character
    assert pieces[2][-5:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "<|end|>"]  # 🙂 as UTF-8 bytes, then <|end|>
    tok4 = toks[PHI4]
    _, targets4 = tokenize({"messages": CONVERSATION}, tok4)
    first = [tok4.id_to_token(targets4[t]) for t in runs(targets4)[0]]
    assert first[0] == "P" and first[-1] == "<|end|>" and "Ġis" in first  # byte-level: no prefix, "Ġ" spaces


def test_leading_whitespace_does_not_train_the_role_marker(toks):
    """`<|assistant|>` has rstrip, so it swallows the content's leading whitespace (and the newline): it is
    still the prompt, never a target."""
    for name in (PHI35, PHI4):
        tok = toks[name]
        row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello\n"}]}
        ids, targets = tokenize(row, tok)
        assert tok.token_to_id("<|assistant|>") not in targets
        assert trained_text(tok, targets) == ["Hello\n<|end|>"]


def test_golden_trained_spans_chatml(toks):
    tok = toks["chatml"]
    ids, targets = tokenize({"messages": CONVERSATION}, tok)
    assert trained_text(tok, targets) == GOLDEN_CHATML
    im_end = tok.token_to_id("<|im_end|>")
    assert end_of_turn_id(tok) == im_end == tok.eos_id == tok.token_to_id(tok.pad_token)
    for r in runs(targets):
        assert tok.decode(ids[:r[0] + 1]).endswith("<|im_start|>assistant\n")  # the header is untrained
        assert tok.decode([ids[r[-1] + 2]]) == "\n"  # the newline after <|im_end|> is input, not a target


def test_end_of_turn_of_a_template_that_demands_a_system_turn(toks):
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}" + CHATML
    assert end_of_turn_id(toks["chatml"], strict) == toks["chatml"].token_to_id("<|im_end|>")


def test_pad_equal_to_end_of_turn_still_trains_it(toks):
    base = toks[PHI35]
    tok = Tokenizer.from_parts(base.backend, {**base.config, "pad_token": "<|end|>"})
    end = tok.token_to_id("<|end|>")
    assert tok.token_to_id(tok.pad_token) == end
    ids, targets = tokenize({"messages": CONVERSATION}, tok)
    assert (ids, targets) == tuple(tokenize({"messages": CONVERSATION}, base))
    assert targets.count(end) == 3
    batch = collate([(ids, targets), (ids[:10], targets[:10])], pad_id=end)  # padding with the end id
    assert (batch["targets"][0] == end).sum() == 3 and batch["targets"][1, 10:].eq(-100).all()


def test_train_on_all(toks):
    for name in (PHI35, PHI4, "chatml"):
        ids, targets = tokenize({"messages": CONVERSATION}, toks[name], train_on="all")
        assert targets == ids[1:] + [-100]


def test_prompt_completion_matches_conversation(toks):
    for name in (PHI35, PHI4, "chatml"):
        tok = toks[name]
        ids, targets = tokenize({"messages": CONVERSATION}, tok)
        # messages form: the prompt's two assistant turns are context, only the completion is trained
        pc_ids, pc_targets = tokenize({"prompt": CONVERSATION[:6], "completion": CONVERSATION[6:], "id": 7}, tok)
        assert pc_ids == ids
        want = list(targets)
        for r in runs(targets)[:2]:
            for t in r:
                want[t] = -100
        assert pc_targets == want
        assert trained_text(tok, pc_targets) == trained_text(tok, targets)[2:]
        # string form: a user prompt and an assistant completion
        conv = tokenize({"messages": CONVERSATION[1:3]}, tok)
        assert tokenize({"prompt": CONVERSATION[1]["content"], "completion": CONVERSATION[2]["content"]}, tok) == conv


def test_user_quoting_the_answer_is_not_trained(toks):
    """The search for an assistant content starts where its generation prompt ends, not at the user turn."""
    tok = toks[PHI4]
    row = {"messages": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]}
    assert trained_text(tok, tokenize(row, tok)[1]) == ["yes<|end|>"]


# ------------------------------------------------------------------------------------------ reading, errors

def test_read_rows_jsonl(tmp_path):
    rows = [{"messages": CONVERSATION[1:3], "extra": 1}, {"prompt": "a", "completion": "b"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\ufeff" + json.dumps(rows[0]) + "\n\n   \n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert read_rows(path) == rows  # a leading byte-order mark and blank lines are skipped, extra keys kept


def test_read_rows_parquet(tmp_path, toks):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_rows(tmp_path / "d.parquet") == rows
    ds = load_sft_dataset(tmp_path / "d.parquet", toks[PHI35], cache_dir=tmp_path / "cache")
    assert ds.stats["kept"] == 2
    # both formats in one file: parquet fills the other format's columns with nulls
    mixed = [{"messages": CONVERSATION[1:3], "prompt": None, "completion": None},
             {"messages": None, "prompt": "Hi", "completion": "Hello"},
             {"messages": [], "prompt": None, "completion": None}]
    pq.write_table(pa.Table.from_pylist(mixed), tmp_path / "m.parquet")
    assert read_rows(tmp_path / "m.parquet")[1] == mixed[1]
    with pytest.raises(SFTDataError, match=r"m\.parquet row 3: 'messages' must be a non-empty list"):
        load_sft_dataset(tmp_path / "m.parquet", toks[PHI35], cache_dir=tmp_path / "cache")
    pq.write_table(pa.Table.from_pylist(mixed[:2]), tmp_path / "m.parquet")
    assert load_sft_dataset(tmp_path / "m.parquet", toks[PHI35], cache_dir=tmp_path / "cache").stats["kept"] == 2


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow.parquet` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(SFTDataError, match=r"d\.parquet: reading parquet needs pyarrow \(pip install pyarrow"):
        read_rows(tmp_path / "d.parquet")


GOOD = {"messages": CONVERSATION[1:3]}


@pytest.mark.parametrize("bad, expected", [
    ({"text": "hello"}, "has no 'messages' (nor 'prompt' and 'completion')"),
    ({"prompt": "hello"}, "has a 'prompt' but no 'completion'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0] has role 'tool'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["y"]}]},
     "messages[1] content must be a string, got list"),
    ({"prompt": "x", "completion": [{"role": "assistant", "content": None}]}, "completion[0] content must be a string"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}, "no assistant message"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]},
     "no assistant message to train on in the completion"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_row_errors_name_file_and_line(tmp_path, toks, bad, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", bad])  # line 2 is blank: the bad row is line 3
    with pytest.raises(SFTDataError) as e:
        load_sft_dataset(path, toks[PHI35], cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and expected in msg and "\n" not in msg


def test_file_errors(tmp_path, toks):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SFTDataError, match=r"data\.csv: not a \.jsonl or \.parquet file"):
        load_sft_dataset(tmp_path / "data.csv", toks[PHI35], cache_dir=tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(SFTDataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_sft_dataset(tmp_path / "latin1.jsonl", toks[PHI35], cache_dir=tmp_path)
    with pytest.raises(SFTDataError, match=r"missing\.jsonl: no such file"):
        read_rows(tmp_path / "missing.jsonl")


def test_template_without_findable_spans(tmp_path, toks):
    """A template that rewrites the content (here upper-cases it), or closes a turn with no token: one-line errors."""
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    upper = toks[PHI35].chat_template.replace("message['content']", "message['content'] | upper")
    with pytest.raises(SFTDataError) as e:
        load_sft_dataset(path, toks[PHI35], template=upper, cache_dir=tmp_path / "c")
    assert str(e.value).startswith(f"{path}:1: messages[1] (assistant): the chat template does not render its "
                                   "content verbatim") and "\n" not in str(e.value)
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(SFTDataError, match=rf"^{path}:1: messages\[1\] \(assistant\): no end-of-turn token follows"):
        load_sft_dataset(path, toks[PHI35], template=plain, cache_dir=tmp_path / "c")
    failing = "{{ raise_exception('roles must alternate\nuser/assistant') }}"
    with pytest.raises(SFTDataError) as e:
        load_sft_dataset(path, toks[PHI35], template=failing, cache_dir=tmp_path / "c")
    assert str(e.value).startswith(f"{path}:1: chat template failed: roles must alternate") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ cache, max_len

class CountingBackend:
    """A tokenizers.Tokenizer that counts encode calls."""

    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.backend.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_cache_hit_miss_and_corruption(tmp_path, toks):
    rows = [{"messages": CONVERSATION}, GOOD, {"prompt": "Hi", "completion": "Hello"}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    cache = tmp_path / "cache"
    first = load_sft_dataset(path, toks[PHI35], cache_dir=cache)
    files = list(cache.iterdir())
    assert [f.suffix for f in files] == [".safetensors"]  # one file, no temporary left behind
    counting = CountingBackend(toks[PHI35].backend)
    tok = Tokenizer.from_parts(counting, toks[PHI35].config)
    again = load_sft_dataset(path, tok, cache_dir=cache)
    assert counting.calls == 0  # read from the cache: nothing tokenized
    assert again.stats == first.stats and len(again) == len(first) == 3
    for (a, b), (c, d) in zip(first.examples, again.examples):
        assert torch.equal(a, c) and torch.equal(b, d) and a.dtype == torch.int32
    assert [x.tolist() for x in first[0]] == list(tokenize({"messages": CONVERSATION}, toks[PHI35]))

    keys = {sft.cache_key(path, toks[PHI35], None, "assistant", 2048, "drop"),
            sft.cache_key(path, toks[PHI35], None, "all", 2048, "drop"),
            sft.cache_key(path, toks[PHI35], None, "assistant", 1024, "drop"),
            sft.cache_key(path, toks[PHI35], None, "assistant", 2048, "truncate"),
            sft.cache_key(path, toks[PHI35], CHATML, "assistant", 2048, "drop"),
            sft.cache_key(path, toks[PHI4], None, "assistant", 2048, "drop")}
    assert len(keys) == 6 and files[0].stem in keys
    load_sft_dataset(path, toks[PHI35], train_on="all", cache_dir=cache)
    load_sft_dataset(path, toks[PHI35], max_len=1024, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3

    for damage in (b"not a safetensors file", files[0].read_bytes()[:-7]):  # garbage; truncated
        files[0].write_bytes(damage)
        counting.calls = 0
        with pytest.warns(UserWarning, match="ignoring unreadable SFT cache"):
            rebuilt = load_sft_dataset(path, tok, cache_dir=cache)
        assert counting.calls > 0 and rebuilt.stats == first.stats
        assert all(torch.equal(a, c) for (a, _), (c, _) in zip(first.examples, rebuilt.examples))
        counting.calls = 0
        load_sft_dataset(path, tok, cache_dir=cache)  # the rebuilt file is good again
        assert counting.calls == 0


def test_unwritable_cache_still_loads(tmp_path, toks):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    (tmp_path / "file").write_text("not a directory")
    with pytest.warns(UserWarning, match="could not write the SFT cache"):
        ds = load_sft_dataset(path, toks[PHI35], cache_dir=tmp_path / "file" / "cache")
    assert ds.stats["kept"] == 1


def test_max_len_drop_and_truncate(tmp_path, toks):
    tok = toks[PHI35]
    long_prompt = {"messages": [{"role": "user", "content": "What is the capital of France? " * 8},
                                {"role": "assistant", "content": "Paris."}]}
    rows = [GOOD, {"messages": CONVERSATION}, long_prompt]
    lengths = [len(tokenize(r, tok)[0]) for r in rows]
    first_trained = [runs(tokenize(r, tok)[1])[0][0] for r in rows]
    max_len = first_trained[1] + 4  # the conversation keeps part of its first answer, the long prompt none
    assert lengths[0] <= max_len < lengths[1] and first_trained[2] >= max_len - 1
    path = write_jsonl(tmp_path / "data.jsonl", rows)

    ds = load_sft_dataset(path, tok, max_len=max_len, cache_dir=tmp_path / "c")
    assert ds.stats == dict(rows=3, kept=1, dropped_too_long=2, truncated=0, dropped_no_target=0,
                            tokens=lengths[0], trained_tokens=sum(t != -100 for t in tokenize(GOOD, tok)[1]))

    ds = load_sft_dataset(path, tok, max_len=max_len, overflow="truncate", cache_dir=tmp_path / "c")
    assert {k: ds.stats[k] for k in ("rows", "kept", "dropped_too_long", "truncated", "dropped_no_target")} == \
        dict(rows=3, kept=2, dropped_too_long=0, truncated=2, dropped_no_target=1)  # the long prompt keeps no target
    ids, targets = ds.examples[1]
    full_ids, full_targets = tokenize({"messages": CONVERSATION}, tok)
    assert ids.tolist() == full_ids[:max_len]
    assert targets.tolist() == full_targets[:max_len - 1] + [-100]  # the cut position predicts nothing
    assert ds.stats["tokens"] == lengths[0] + max_len
    assert ds.stats["trained_tokens"] == sum(int((t != -100).sum()) for _, t in ds.examples)


# ------------------------------------------------------------------------------------------ losses

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """preset -> (transformers model, phikit model converted from its checkpoint), float32."""
    out = {}
    for preset in ("phi-3-mini-4k-instruct", PHI35):
        path = tmp_path_factory.mktemp(preset)
        hf = write_checkpoint(tiny_config(preset), path)
        out[preset] = hf, load_model(path)
    return out


def test_loss_matches_transformers(models, toks):
    """cross_entropy(model(ids), shifted targets) == Phi3ForCausalLM(input_ids, labels=unshifted labels).loss."""
    hf, model = models["phi-3-mini-4k-instruct"]  # sliding window WINDOW: the examples are longer
    tok = toks["phi-3-mini-4k-instruct"]
    rows = [{"messages": CONVERSATION}, GOOD, {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:5]}]
    examples = [tokenize(r, tok) for r in rows]
    assert min(len(i) for i, _ in examples) > WINDOW and max(max(i) for i, _ in examples) < VOCAB
    batch = collate(examples, pad_id=tok.token_to_id("<|endoftext|>"))
    # transformers' labels: the token itself where it is trained (labels[:, t + 1] = targets[:, t])
    labels = torch.cat([torch.full_like(batch["targets"][:, :1], -100), batch["targets"][:, :-1]], dim=1)
    with torch.no_grad():
        want = hf(input_ids=batch["ids"], attention_mask=(batch["segments"] >= 0).long(), labels=labels).loss
        got = cross_entropy(model(batch["ids"], input_pos=batch["positions"], segments=batch["segments"]),
                            batch["targets"])
        plain = cross_entropy(model(batch["ids"]), batch["targets"])  # right padding is invisible to causal rows
    print(f"\n[sft loss] phikit {got.item():.6f} transformers {want.item():.6f}")
    assert abs(got.item() - want.item()) <= 1e-5 and abs(plain.item() - want.item()) <= 1e-5


def synthetic_examples(lengths, seed=0):
    """Random ids with a random half of the next tokens trained (the last target is always -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        targets = torch.where(torch.rand(n, generator=g) < 0.5, ids.roll(-1), -100)
        targets[-1] = -100
        p = int(torch.randint(0, n - 1, (1,), generator=g))
        targets[p] = ids[p + 1]  # at least one trained target
        out.append((ids, targets))
    return out


def per_example_losses(model, rows, n_examples):
    """(sum of token losses, trained count) per example, from packed rows."""
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(batch["ids"], input_pos=batch["positions"], segments=batch["segments"])
    tok_loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none").view_as(batch["ids"])
    sums, counts = torch.zeros(n_examples, dtype=torch.float64), torch.zeros(n_examples)
    for b, row in enumerate(rows):
        for seg, i in enumerate(row.examples):
            m = (batch["segments"][b] == seg) & (batch["targets"][b] != -100)
            sums[i], counts[i] = tok_loss[b][m].double().sum(), m.sum()
    return sums, counts


@pytest.mark.parametrize("preset", ["phi-3-mini-4k-instruct", PHI35])  # sliding window; LongRoPE
def test_packed_rows_give_unpacked_losses(models, preset):
    _, model = models[preset]
    cfg = model.cfg
    lengths = [33, 27, 20, 14, 12, 9, 5, 3]  # across WINDOW = 11 and the LongRoPE switch ORIG = 16
    examples = synthetic_examples(lengths)
    switch = cfg.original_max_seq_len if cfg.longrope else None
    rows = pack(examples, 48, longrope_switch=switch)
    assert len(rows) < len(examples) and all(len(r.ids) == 48 for r in rows)
    sums, counts = per_example_losses(model, rows, len(examples))
    with torch.no_grad():
        alone = [F.cross_entropy(model(ids[None])[0], targets, reduction="sum").double() for ids, targets in examples]
    alone = torch.stack(alone)
    assert torch.equal(counts, torch.tensor([float((t != -100).sum()) for _, t in examples]))
    delta = (sums / counts - alone / counts).abs().max().item()
    total = abs((sums.sum() / counts.sum() - alone.sum() / counts.sum()).item())
    print(f"\n[packing] {preset}: per-example max|delta| {delta:.2e}, summed-loss |delta| {total:.2e}")
    assert delta <= 1e-5 and total <= 1e-5
    if cfg.longrope:  # without the split, a short example shares a row with a long one and gets the long factors
        assert cfg.original_max_seq_len == ORIG
        mixed, _ = per_example_losses(model, pack(examples, 48), len(examples))
        assert (mixed / counts - alone / counts).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ packing, batches

def test_pack_layout():
    examples = synthetic_examples([7, 3, 9, 2, 5, 6])
    rows = pack(examples, 12, pad_id=5)
    again = pack(examples, 12, pad_id=5)  # deterministic
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for a, b in zip(rows, again)
               for f in ("ids", "targets", "positions", "segments"))
    # first-fit decreasing: 9, 7, 6 open three rows; 5 joins the 7, 3 the 9, 2 the 6
    assert [r.examples for r in rows] == [[2, 1], [0, 4], [5, 3]]
    assert sorted(i for r in rows for i in r.examples) == list(range(6))
    for r in rows:
        t = 0
        for seg, i in enumerate(r.examples):
            ids, targets = examples[i]
            n = len(ids)
            assert torch.equal(r.ids[t:t + n], ids) and torch.equal(r.targets[t:t + n], targets)
            assert r.positions[t:t + n].tolist() == list(range(n)) and r.segments[t:t + n].eq(seg).all()
            t += n
        assert r.ids[t:].eq(5).all() and r.targets[t:].eq(-100).all()  # tail: pad id, no targets,
        assert r.positions[t:].eq(0).all() and r.segments[t:].eq(-1).all()  # position 0, a segment of its own
    with pytest.raises(ValueError, match="does not fit max_len=8"):
        pack(examples, 8)


def test_first_fit_decreasing_large():
    """The segment-tree first fit places like the textbook quadratic scan."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 500).tolist()
    bins, free = [], []
    for i, n in enumerate(lengths):
        b = next((j for j, f in enumerate(free) if f >= n), len(free))
        if b == len(free):
            bins.append([])
            free.append(100)
        bins[b].append(i)
        free[b] -= n
    assert sft._first_fit(lengths, 100) == bins


def test_collate_examples():
    examples = synthetic_examples([5, 3])
    batch = collate(examples, pad_id=9)
    assert set(batch) == {"ids", "targets", "positions", "segments"}
    assert all(v.shape == (2, 5) and v.dtype == torch.int64 for v in batch.values())
    assert batch["ids"][1].tolist()[3:] == [9, 9] and batch["targets"][1, 3:].eq(-100).all()
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    assert batch["segments"].tolist() == [[0] * 5, [0, 0, 0, -1, -1]]


def test_epoch_batches():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 1000, 2003)
    for group in (False, True):
        a = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)
        assert a == epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)  # deterministic
        assert a != epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=group)
        assert a != epoch_batches(lengths, 8, seed=4, epoch=0, group_by_length=group)
        assert len(a) == 2003 // 8 and all(len(b) == 8 for b in a)  # the incomplete batch is dropped
        flat = [i for b in a for i in b]
        assert len(set(flat)) == len(flat)

    def padding(batches):  # pad tokens when each batch is padded to its longest item
        return sum(8 * max(lengths[b]) - lengths[b].sum() for b in batches)

    plain = epoch_batches(lengths, 8, 3, 0, False)
    grouped = epoch_batches(lengths, 8, 3, 0, True)
    assert padding(grouped) < 0.1 * padding(plain)
    assert all(list(lengths[b]) == sorted(lengths[b], reverse=True) for b in grouped)  # sorted within a chunk
    by_len = [max(lengths[b]) for b in grouped]
    assert by_len != sorted(by_len, reverse=True)  # but the batch order is shuffled


# ------------------------------------------------------------------------------------------ against TRL

@pytest.mark.parametrize("name", [PHI35, PHI4, "chatml"])
def test_prompt_completion_tokens_agree_with_trl(toks, name, tmp_path):
    """TRL's prompt-completion path (trl.data_utils.apply_chat_template, then tokenizing the prompt and the
    prompt + completion with the transformers tokenizer) gives the same ids, and its completion tokens start
    with exactly the ones phikit trains: TRL also trains what the template puts after the end-of-turn token
    (Phi-3.5's trailing <|endoftext|>, ChatML's newline), which phikit leaves out."""
    from transformers import PreTrainedTokenizerFast
    from trl.data_utils import apply_chat_template

    tok = toks[name]
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token=tok.eos_token,
                                     bos_token=tok.bos_token, pad_token=tok.pad_token or tok.eos_token)
    hf_tok.chat_template = tok.chat_template or sft.family_template(sft.guess_family(tok))
    row = {"prompt": CONVERSATION[:6], "completion": CONVERSATION[6:]}
    text = apply_chat_template(row, hf_tok)
    prompt_ids = hf_tok(text["prompt"], add_special_tokens=False).input_ids
    full_ids = hf_tok(text["prompt"] + text["completion"], add_special_tokens=False).input_ids
    ids, targets = tokenize(row, tok)
    assert ids == full_ids and full_ids[:len(prompt_ids)] == prompt_ids
    ours = [y for y in targets if y != -100]
    trl_trained = full_ids[len(prompt_ids):]
    assert trl_trained[:len(ours)] == ours
    assert hf_tok.decode(trl_trained[len(ours):]).strip() in ("", tok.eos_token)
