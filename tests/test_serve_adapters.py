"""Several LoRA adapters in one server: each request picks one by its `model` field, all share the batch.

A tiny random Phi-3.5 (LongRoPE switching at 16 tokens, so rows are re-prefilled mid-request) with three
saved adapters of different targets and ranks, non-zero B. Every greedy output of a mixed batch must equal
`generate()` alone on a copy of the base with that adapter merged. The models are float64, so that "equal"
means the math: merged and unmerged weights round differently in float32, which can flip a near-tie.
"""

import collections
import queue
import signal

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from test_serve import start  # noqa: E402
from tiny import tiny_config, write_checkpoint  # noqa: E402
from tiny_tokenizer import build  # noqa: E402

import phikit  # noqa: E402
from phikit.chat_format import stop_ids  # noqa: E402
from phikit.commands.serve import main as serve_main  # noqa: E402
from phikit.generate import decode_one, generate, stream_text  # noqa: E402
from phikit.serve import Engine, Request  # noqa: E402
from phikit.serve.app import create_app  # noqa: E402
from phikit.serve.engine import _Slot  # noqa: E402
from phikit.train.adapters import load_adapter, save_adapter  # noqa: E402
from phikit.train.lora import LoRALinear, apply_lora, merge_lora, set_active  # noqa: E402

PRESET = "phi-3.5-mini-instruct"
TARGETS = {"a": "all-linear", "b": ["qkv_proj", "o_proj"], "c": ["gate_up_proj", "lm_head"]}
ROWS = ["a", "b", "c", None, "a", "b", "c", None]
N = 20  # tokens per request: prompts of 3..10 tokens all cross the LongRoPE switch at 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(base checkpoint, {name: adapter directory}, {name or None: reference model, the adapter merged})."""
    root = tmp_path_factory.mktemp("serve-adapters")
    base = root / "base"
    write_checkpoint(tiny_config(PRESET), base)
    build(PRESET, base)
    dirs, refs = {}, {None: phikit.load(base, dtype=torch.float64)[0]}
    for i, (name, targets) in enumerate(TARGETS.items()):
        model, _ = phikit.load(base)
        apply_lora(model, targets, r=2 + i, alpha=8, name=name)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():  # non-zero B: PEFT's zero init would make every adapter the base
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        dirs[name] = save_adapter(model, root / name, base_model=str(base), name=name)
        refs[name] = merge_lora(load(base, {name: dirs[name]}, active=name), name)
    return base, dirs, refs


def load(base, dirs, active=None):
    """The base in float64 with the adapters loaded unmerged, `active` active."""
    model, _ = phikit.load(base, dtype=torch.float64)
    for name, d in dirs.items():
        load_adapter(model, d, name=name)
    set_active(model, active)
    return model


def greedy(model, prompt, n=N):
    return [t for (t,) in generate(model, [prompt], n)]


def row_adapters(model, rows: int) -> list[str | None]:
    """The adapter of each batch row that set_row_adapters gave the model's LoRA layers."""
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    names = [None] * rows
    for name, idx in layer.row_groups:
        for r in range(rows) if idx is None else idx.tolist():
            names[r] = name
    return names


def test_a_batch_of_different_adapters_equals_each_merged_alone(ckpt, monkeypatch):
    base, dirs, refs = ckpt
    tok = phikit.load(base)[1]
    model = load(base, dirs)
    batches = []

    def decode(m, tokens, pos):  # eager decode_one, recording which adapter each row had
        batches.append(row_adapters(m, tokens.shape[0]))
        return decode_one(m, tokens, pos)

    tokens = collections.defaultdict(list)
    accept = _Slot.accept
    monkeypatch.setattr(_Slot, "accept", lambda self, t: (tokens[id(self.req)].append(t), accept(self, t))[1])
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (3 + i,), generator=gen).tolist() for i in range(8)]
    done = queue.Queue()
    engine = Engine(model, tok, max_batch=8, max_context=64, decode_fn=decode)
    assert engine.adapters == ["a", "b", "c"] and engine.default_adapter is None
    reqs = [Request(prompt=p, max_tokens=N, adapter=a, emit=lambda e: e.finish_reason and done.put(e))
            for p, a in zip(prompts, ROWS)]
    with engine._cond:  # all 8 are queued before the engine thread can admit one: one batch from the start
        for r in reqs:
            engine.submit(r)
    assert all(done.get(timeout=60).finish_reason == "length" for _ in reqs)
    engine.close()
    assert batches == [ROWS] * (N - 1)  # every decode step ran the 8 rows together, each with its adapter
    for p, a, r in zip(prompts, ROWS, reqs):
        want = greedy(refs[a], p)
        assert tokens[id(r)] == want, a
        if a is not None:
            assert want != greedy(refs[None], p)  # the adapter does change the output
    assert all(layer.row_groups is None for layer in model.modules() if isinstance(layer, LoRALinear))


def test_an_adapter_directory_as_the_model_serves_that_adapter_to_every_request(ckpt):
    """`phikit serve --model ADAPTER_DIR`: the adapter loaded with the model is the default, not a name."""
    base, dirs, refs = ckpt
    model, tok = phikit.load(dirs["b"], dtype=torch.float64)
    engine = Engine(model, tok, max_batch=2, max_context=64)
    assert (engine.default_adapter, engine.adapters) == ("default", [])
    got = queue.Queue()
    prompt = [5, 6, 7, 8]
    engine.submit(Request(prompt=prompt, max_tokens=N, emit=got.put))
    text = ""
    while (e := got.get(timeout=60)).finish_reason is None:
        text += e.text
    engine.close()
    assert text + e.text == tok.decode(greedy(refs["b"], prompt), skip_special_tokens=True)


def test_the_model_field_picks_the_adapter(ckpt):
    base, dirs, refs = ckpt
    tok = phikit.load(base)[1]
    engine = Engine(load(base, dirs), tok, max_batch=4, max_context=64)
    server, thread, port = start(create_app(engine, "tiny-phi"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    try:
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny-phi", "a", "b", "c"]
        assert [getattr(m, "parent", None) for m in models] == [None, "tiny-phi", "tiny-phi", "tiny-phi"]
        ids = tok.encode("The quick brown", add_special_tokens=True)
        for name, adapter in (("a", "a"), ("c", "c"), ("tiny-phi", None), ("gpt-4o", None)):
            r = client.completions.create(model=name, prompt="The quick brown", max_tokens=N, temperature=0)
            want = "".join(stream_text(refs[adapter], tok, ids, N, stop_ids=stop_ids(tok)))
            assert (r.choices[0].text, r.model) == (want, adapter or "tiny-phi"), name
        chat = [{"role": "user", "content": "Hello"}]
        a, plain = (client.chat.completions.create(model=m, messages=chat, max_tokens=8, temperature=0)
                    for m in ("a", "tiny-phi"))
        assert a.model == "a" and a.choices[0].message.content != plain.choices[0].message.content
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def no_server(monkeypatch):
    """`phikit serve` up to the point where uvicorn would serve."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)


def test_serve_command_loads_several_adapters(ckpt, no_server, capsys):
    base, dirs, _ = ckpt
    argv = ["--model", str(base), "--max-context", "32", "--max-batch", "2"]
    assert serve_main(argv + [f"--adapter={n}={d}" for n, d in dirs.items()]) == 0
    assert "context 32; adapters a, b, c)" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--adapter", "x=/nonexistent/adapter"], "phikit: /nonexistent/adapter: no such adapter directory"),
    (["--adapter", "base=A"], "the name 'base' is the model's own id"),
    (["--adapter", "a=A", "--compile"], "--compile cannot be combined with --adapter"),
])
def test_serve_command_adapter_errors_are_one_line(ckpt, no_server, extra, message):
    base, dirs, _ = ckpt
    extra = [x.replace("=A", f"={dirs['a']}") for x in extra]
    with pytest.raises(SystemExit) as e:
        serve_main(["--model", str(base), "--max-context", "32", *extra])
    assert message in str(e.value.code) and "\n" not in str(e.value.code)
