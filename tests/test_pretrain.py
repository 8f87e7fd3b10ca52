"""Pretraining: schedules, weight-decay groups, the mixture sampler, and `phikit pretrain` end to end:
two phases, metrics/PNG/checkpoints/final model, exact resume after SIGKILL, 2-process FSDP2 and DDP
runs equal to the 1-process run, and clear errors for bad input that leave earlier files intact."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import phikit
from phikit.config import Config
from phikit.data.shards import ShardError, load_tokens, write_manifest, write_shard
from phikit.train import checkpointing
from phikit.train.data import MixtureData
from phikit.train.losses import cross_entropy
from phikit.train.optim import lr_at, param_groups

ROOT = Path(__file__).resolve().parents[1]
STEPS = (24, 16)  # optimizer steps of phase 1 and phase 2
SEQ, BATCH = 32, 8


def tiny_model_cfg(**kw) -> Config:
    return Config.from_name("phi-3-mini-4k-instruct", n_layers=2, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=128,
                            vocab_size=512, max_seq_len=128, original_max_seq_len=128, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The example's corpus generator, small: four sources and a 512-token BPE tokenizer."""
    out = tmp_path_factory.mktemp("shards")
    spec = importlib.util.spec_from_file_location("make_tiny_shards", ROOT / "examples" / "make_tiny_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(out), "--tokens", "20000"])
    return out


def write_config(path: Path, shards: Path, **changes) -> Path:
    cfg = {
        "seed": 3,
        "model": {"preset": "phi-3-mini-4k-instruct", "n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 4,
                  "ffn_dim": 128, "vocab_size": 512, "max_seq_len": 128, "original_max_seq_len": 128},
        "tokenizer": str(shards / "tokenizer"),
        "data": {"seq_len": SEQ, "val_tokens": 1024,
                 "sources": {n: str(shards / n) for n in ("web", "code", "filtered_web", "synthetic")}},
        "phases": [{"name": "phase1", "tokens": STEPS[0] * BATCH * SEQ, "mixture": {"web": 0.9, "code": 0.1}},
                   {"name": "phase2", "tokens": STEPS[1] * BATCH * SEQ,
                    "mixture": {"filtered_web": 0.6, "synthetic": 0.4}}],
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "schedule": "cosine"},
        "train": {"batch_size": BATCH, "micro_batch": 2, "precision": "float32", "threads": 1,
                  "eval_every": 10, "checkpoint_every": 3, "keep_checkpoints": 2},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(cfg))
    return path


def pretrain_cmd(config: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "phikit", "pretrain", "--config", str(config), "--out", str(out), *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, sum(STEPS) + 1))
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """One uninterrupted 1-process float32 run of 40 steps (24 + 16) over two phases."""
    d = tmp_path_factory.mktemp("reference")
    run(pretrain_cmd(write_config(d / "cfg.json", shards), d / "run"))
    return d / "run"


# ---- library pieces ---------------------------------------------------------------------------------------

def test_cosine_and_wsd_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=110)
    cos = [lr_at(s, schedule="cosine", **kw) for s in range(1, 111)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == 1.0              # linear warmup to lr at step 10
    assert cos[59] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: (lr + min_lr) / 2
    assert cos[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cos[9:], cos[10:]))
    wsd = [lr_at(s, schedule="wsd", decay_frac=0.2, **kw) for s in range(1, 111)]
    assert wsd[9:88] == [1.0] * 79                                     # stable until the last 22 steps
    assert wsd[98] == pytest.approx(1.0 - 0.9 * 11 / 22) and wsd[-1] == pytest.approx(0.1)  # linear decay
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(1, schedule="step", **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_weight_decay_groups(tied):
    model = phikit.Phi3(tiny_model_cfg(tie_embeddings=tied))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{n}_layernorm.weight" for i in range(2) for n in ("input", "post_attention")}
    assert ("lm_head.weight" in {names[id(p)] for p in decay["params"]}) != tied  # tied lm_head is the embedding
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cross_entropy_ignores_masked_labels():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, -100, 3], [-100, 5, 6]])
    logp = logits.log_softmax(-1)
    want = -(logp[0, 0, 1] + logp[0, 2, 3] + logp[1, 1, 5] + logp[1, 2, 6]) / 4
    torch.testing.assert_close(cross_entropy(logits, labels), want)


def test_mixture_sampler_is_a_function_of_seed_and_step(shards):
    sources = {n: shards / n for n in ("web", "code")}
    data = MixtureData(sources, seq_len=SEQ, val_tokens=512, seed=1)
    mix = {"web": 0.75, "code": 0.25}
    whole = data.batch(5, mix, 8)
    assert whole.shape == (8, SEQ + 1) and whole.dtype == torch.int64
    assert torch.equal(MixtureData(sources, SEQ, 512, seed=1).batch(5, mix, 8), whole)  # fresh sampler, same batch
    assert torch.equal(torch.cat([data.batch(5, mix, 8, rank=r, world=2) for r in range(2)]), whole)
    assert not torch.equal(data.batch(6, mix, 8), whole)
    picks = [src for step in range(200) for src, _, _ in data.global_batch(step, mix, 8)]
    assert abs(picks.count("web") / len(picks) - 0.75) < 0.03
    for src, shard, offset in data.global_batch(7, mix, 400):  # windows never reach the held-out tail
        assert offset + SEQ + 1 <= len(data.train[src][shard])
    last = load_tokens(shards / "web")[-1]
    assert np.array_equal(data.val["web"], last[-512:])
    val = data.val_batches("web", micro_batch=4, rank=1, world=2)
    assert sum(len(b) for b in val) == 512 // (SEQ + 1) // 2


def test_a_val_directory_from_phikit_data_pack_is_the_validation_set(tmp_path):
    for d, tokens in ((tmp_path, np.arange(100) % 7), (tmp_path / "val", np.arange(200, 266))):
        d.mkdir(exist_ok=True)
        write_shard(d / "shard-00000.bin", tokens)
        write_manifest(d, {"vocab_size": 300, "eos_id": 0, "shards": [{"file": "shard-00000.bin", "tokens": len(tokens)}]})
    data = MixtureData({"web": tmp_path}, seq_len=10, val_tokens=50)
    assert len(data.train["web"][0]) == 100  # nothing held out of the training shards
    assert torch.equal(torch.cat(data.val_batches("web", 2)), torch.arange(200, 266).reshape(6, 11))
    with pytest.raises(ShardError, match="no shard of seq_len"):
        MixtureData({"web": tmp_path}, seq_len=100)


# ---- the recipe end to end ------------------------------------------------------------------------------

def test_two_phase_run_writes_metrics_plot_checkpoints_and_final_model(reference):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["phase1"] * STEPS[0] + ["phase2"] * STEPS[1]
    assert {"step", "loss", "lr", "tokens", "grad_norm"} <= set(records[0])
    assert records[-1]["tokens"] == sum(STEPS) * BATCH * SEQ
    # validation per source every 10 steps and at the end of each phase
    assert [r["step"] for r in records if "val" in r] == [10, 20, 24, 30, 40]
    assert set(records[-1]["val"]) == {"web", "code", "filtered_web", "synthetic"}
    # golden: the first losses of this config (seed 3, float32, 1 thread), from this run when it was written
    # (again when the example tokenizer reserved the four chat tokens); ln(512) = 6.238 is a uniform guess
    assert [r["loss"] for r in records[:3]] == pytest.approx([6.23576, 6.18502, 6.09088], abs=2e-3)
    assert records[STEPS[0] - 1]["loss"] < records[0]["loss"] - 1.0
    assert (reference / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in checkpointing.list_checkpoints(reference / "checkpoints")] == ["step-000039", "step-000040"]
    model, tokenizer = phikit.load(reference / "final")
    assert tokenizer is not None and model.cfg.n_layers == 2 and model.cfg.eos_token_id == tokenizer.eos_id
    out = subprocess.run([sys.executable, "-m", "phikit", "generate", "--model", str(reference / "final"),
                          "--prompt", "The capital of", "--max-new-tokens", "8", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_resume_after_sigkill_reproduces_the_losses_exactly(reference, shards, tmp_path):
    config = write_config(tmp_path / "cfg.json", shards)
    out = tmp_path / "run"
    proc = subprocess.Popen(pretrain_cmd(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, killed_after = out / "metrics.jsonl", 0
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 8:  # past two checkpoints (every 3 steps)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_after = len(lines)
            break
        time.sleep(0.002)
    assert killed_after and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "final").exists()
    resumed_from = checkpointing.latest(out / "checkpoints")
    assert resumed_from is not None and int(resumed_from.name[5:]) < sum(STEPS)
    run(pretrain_cmd(config, out, "--resume"))
    assert losses(out) == losses(reference)  # bit for bit, steps before and after the kill
    val = [json.loads(line).get("val") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert val == [json.loads(line).get("val") for line in (reference / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_process_run_matches_one_process(reference, shards, tmp_path, mode):
    """Same global batch (8 sequences: 4 micro-batches of 2 on one process, 2 on each of two), float32, gloo."""
    config = write_config(tmp_path / "cfg.json", shards)
    run(pretrain_cmd(config, tmp_path / "run", *(["--ddp"] if mode == "ddp" else []), nproc=2))
    one, two = np.array(losses(reference)), np.array(losses(tmp_path / "run"))
    assert np.max(np.abs(two - one) / one) <= 1e-4
    a, _ = phikit.load(reference / "final")
    b, _ = phikit.load(tmp_path / "run" / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_process(reference, shards, tmp_path):
    """Checkpoints hold full tensors, so a 2-process FSDP run can continue on one process."""
    config = write_config(tmp_path / "cfg.json", shards)
    run(pretrain_cmd(config, tmp_path / "run", nproc=2))
    shutil.rmtree(tmp_path / "run" / "final")
    for ckpt in checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")[1:]:
        shutil.rmtree(ckpt)  # keep step 39 only
    run(pretrain_cmd(config, tmp_path / "run", "--resume"))
    assert np.allclose(losses(tmp_path / "run"), losses(reference), rtol=1e-4)


# ---- bad input ----------------------------------------------------------------------------------------------

def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def pretrain_error(*argv) -> str:
    from phikit.recipes.pretrain import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return str(e.value)


def test_mixture_naming_a_missing_source_is_refused_before_writing(shards, reference, tmp_path):
    bad = {"phases": [{"name": "phase1", "tokens": 1000, "mixture": {"web": 0.5, "books": 0.5}}]}
    config = write_config(tmp_path / "cfg.json", shards, **bad)
    err = pretrain_error("--config", config, "--out", tmp_path / "new")
    assert "'books'" in err and "data.sources" in err and not (tmp_path / "new").exists()
    # a source directory without a manifest, and an existing run that --resume was not given for
    config = write_config(tmp_path / "cfg.json", shards, data={"sources": {"web": str(tmp_path), "code": str(tmp_path),
                                                                           "filtered_web": "x", "synthetic": "y"}})
    assert "has no manifest.json" in pretrain_error("--config", config, "--out", tmp_path / "new")
    run_dir = tmp_path / "old"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    assert "already holds a run" in pretrain_error("--config", write_config(tmp_path / "c.json", shards),
                                                   "--out", run_dir)
    assert "'books'" in pretrain_error("--config", write_config(tmp_path / "c.json", shards, **bad), "--out", run_dir,
                                       "--resume")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "json"])
def test_corrupt_checkpoint_on_resume_is_named_and_nothing_is_lost(shards, reference, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = checkpointing.latest(run_dir / "checkpoints")
    target = ckpt / ("state.json" if damage == "json" else "state.safetensors")
    data = target.read_bytes()
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one byte of the last tensor
    target.write_bytes({"truncate": data[:len(data) // 2], "flip": bytes(flipped), "json": data[:40]}[damage])
    (run_dir / "checkpoints" / ".step-000041.tmp").mkdir()  # a save that was killed half-way: ignored
    before = snapshot(run_dir)
    err = pretrain_error("--config", write_config(tmp_path / "cfg.json", shards), "--out", run_dir, "--resume")
    assert str(target) in err and "corrupt" in err
    assert snapshot(run_dir) == before
