"""`phikit pretrain --config FILE --out DIR [--resume [CKPT]] [--ddp]`: two-phase pretraining from scratch.

One process, or N under `torchrun --nproc-per-node N` (FSDP2 `fully_shard` per block and at the root by
default, DDP with --ddp; gloo on the CPU, nccl on GPUs). The config file (YAML or JSON; relative paths
are relative to the file) has these sections; every key but `model.preset`, `data.sources` and `phases`
has the default shown:

    seed: 0
    model: {preset: phi-3-mini-4k-instruct, n_layers: 2, dim: 64, ...}  # Config.from_name(preset, **rest)
    tokenizer: null                 # directory with tokenizer.json, copied into DIR/final
    data:
      sources: {web: shards/web, code: shards/code}  # name -> directory of packed shards (phikit data pack)
      seq_len: 256
      val_tokens: 8192              # validation: a source's val/ directory, else its last val_tokens held out
    phases:                         # run in order; the lr schedule spans all of them
      - {name: phase1, tokens: 2.0e6, mixture: {web: 0.9, code: 0.1}}
      - {name: phase2, tokens: 1.0e6, mixture: {filtered_web: 0.6, synthetic: 0.4}}
    optim: {lr: 3.0e-3, min_lr: 3.0e-4, weight_decay: 0.1, betas: [0.9, 0.95], eps: 1.0e-8,
            schedule: cosine, warmup_steps: 20, decay_frac: 0.2, grad_clip: 1.0}   # schedule: cosine | wsd
    train: {batch_size: 32, micro_batch: 8, precision: float32, compile: false, threads: null,
            eval_every: 50, checkpoint_every: 50, keep_checkpoints: 2}

batch_size counts sequences per optimizer step over all processes; each process runs
batch_size / (micro_batch * world) micro-batches (gradient accumulation), so the same config gives the
same run on any number of processes. A phase lasts ceil(tokens / (batch_size * seq_len)) steps.
precision: float32, or bf16 (bfloat16 autocast; weights, gradients and AdamW state stay float32).

Writes DIR/metrics.jsonl (one object per optimizer step: step, phase, loss, lr, tokens, grad_norm, and
`val` {source: loss} on evaluation steps), DIR/loss.png, DIR/checkpoints/step-N (train/checkpointing.py)
and DIR/final, a checkpoint directory for phikit.load and `phikit generate`. --resume continues from
the newest checkpoint bit for bit: the data order is a function of (seed, step) and the RNG state is
restored. Known limitation: sequences attend across the document boundaries inside a window.

References: nanoGPT `train.py`; torchtune `recipes/full_finetune_distributed.py`; torchtitan (FSDP2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import checkpoint as model_io
from . import run_parser
from ..config import Config, ConfigError
from ..data.shards import ShardError
from ..model import Phi3
from ..tokenizer import Tokenizer, TokenizerError
from ..train import checkpointing
from ..train.distributed import grad_sync, mean_across, setup_distributed, wrap
from ..train.data import MixtureData
from ..train.losses import cross_entropy
from ..train.optim import SCHEDULES, lr_at, make_optimizer
from ..train.run_files import RunFileError, plot_losses, restart_metrics
from ..train.run_files import read_config as read_config_file

DEFAULTS = {
    "seed": 0, "model": {}, "tokenizer": None, "phases": [],
    "data": {"sources": {}, "seq_len": 256, "val_tokens": 8192},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8,
              "schedule": "cosine", "warmup_steps": 20, "decay_frac": 0.2, "grad_clip": 1.0},
    "train": {"batch_size": 32, "micro_batch": 8, "precision": "float32", "compile": False, "threads": None,
              "eval_every": 50, "checkpoint_every": 50, "keep_checkpoints": 2},
}


def parser() -> argparse.ArgumentParser:
    return run_parser("pretrain", __doc__)


def fail(msg: str):
    raise SystemExit(f"phikit pretrain: {msg}")


def read_config(path: Path) -> dict:
    """The config file merged over DEFAULTS, paths made absolute; unknown keys and bad values are errors."""
    try:
        cfg = read_config_file(path, DEFAULTS, free_sections=("model",))
    except RunFileError as e:
        fail(str(e))
    here = path.resolve().parent
    sources = cfg["data"]["sources"] = {n: str(here / d) for n, d in cfg["data"]["sources"].items()}
    if cfg["tokenizer"]:
        cfg["tokenizer"] = str(here / cfg["tokenizer"])
    if "preset" not in cfg["model"]:
        fail(f"{path}: model.preset is required (one of the Config presets, e.g. phi-3-mini-4k-instruct)")
    if not cfg["phases"]:
        fail(f"{path}: phases is empty; give at least one {{name, tokens, mixture}}")
    for i, ph in enumerate(cfg["phases"]):
        ph.setdefault("name", f"phase{i + 1}")
        if not ph.get("mixture") or not ph.get("tokens"):
            fail(f"{path}: phase {ph['name']!r} needs a mixture and a token budget")
        for src, w in ph["mixture"].items():
            if src not in sources:
                fail(f"{path}: phase {ph['name']!r} mixes source {src!r}, which data.sources does not name "
                     f"(named: {', '.join(sources) or 'none'})")
            if not w >= 0:
                fail(f"{path}: phase {ph['name']!r} gives source {src!r} the negative weight {w}")
    t, o = cfg["train"], cfg["optim"]
    if t["batch_size"] % t["micro_batch"]:
        fail(f"{path}: train.batch_size ({t['batch_size']}) must be a multiple of train.micro_batch ({t['micro_batch']})")
    if t["precision"] not in ("float32", "bf16") or o["schedule"] not in SCHEDULES:
        fail(f"{path}: train.precision must be float32 or bf16 and optim.schedule one of {', '.join(SCHEDULES)}")
    return cfg


def plot(records: list[dict], boundaries: list[tuple[int, str]], path: Path) -> None:
    """Training loss and per-source validation loss against tokens, phase boundaries marked; atomic write."""
    sources = sorted({s for r in records for s in r.get("val", {})})
    val = {f"val {src}": [(r["tokens"], r["val"][src]) for r in records if src in r.get("val", {})] for src in sources}
    plot_losses(records, path, x="tokens", val=val, marks=boundaries)


def main(argv: list[str] | None = None) -> int:
    # ---- setup: config, data, model, optimizer, resume -----------------------------------------------
    args = parser().parse_args(argv)
    cfg = read_config(Path(args.config))
    out, t, o = Path(args.out), cfg["train"], cfg["optim"]
    try:
        data = MixtureData(cfg["data"]["sources"], cfg["data"]["seq_len"], cfg["data"]["val_tokens"], cfg["seed"])
        tokenizer = Tokenizer(cfg["tokenizer"]) if cfg["tokenizer"] else None
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id} if tokenizer else {}
        overrides = {k: v for k, v in cfg["model"].items() if k != "preset"}
        model_cfg = Config.from_name(cfg["model"]["preset"], **{**ids, **overrides})
    except (ShardError, TokenizerError, ConfigError) as e:
        fail(str(e))
    except TypeError as e:  # an override that is not a Config field
        fail(f"{args.config}: model: {e}")
    vocab = max(data.vocab_size(), tokenizer.vocab_size if tokenizer else 0)
    if vocab > model_cfg.vocab_size:
        fail(f"the data or tokenizer has a vocabulary of {vocab}, more than model vocab_size {model_cfg.vocab_size}")
    ckpt_root, metrics_path = out / "checkpoints", out / "metrics.jsonl"
    resumed = None
    if args.resume:
        resume_from = checkpointing.latest(ckpt_root) if args.resume == "latest" else Path(args.resume)
        if resume_from is None:
            fail(f"--resume: no checkpoint under {ckpt_root}")
        try:
            resumed = checkpointing.read(resume_from)  # (state.json, tensors), checksum verified
        except model_io.CheckpointError as e:
            fail(str(e))
        if resumed[0].get("config") != cfg:
            print(f"phikit pretrain: warning: {args.config} differs from the config {resume_from} was trained with; "
                  "the run will not match an uninterrupted one", file=sys.stderr)
    elif metrics_path.exists() or checkpointing.latest(ckpt_root):
        fail(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if importlib.util.find_spec("matplotlib") is None:  # fail now, not after training
        fail("the loss curve needs matplotlib: pip install 'phikit[train]'")

    T, B, mb = cfg["data"]["seq_len"], t["batch_size"], t["micro_batch"]
    rank, world, device = setup_distributed()
    if B % (mb * world):
        fail(f"train.batch_size ({B}) must be a multiple of micro_batch * processes ({mb} * {world})")
    if args.threads or t["threads"]:
        torch.set_num_threads(args.threads or t["threads"])
    torch.manual_seed(cfg["seed"])  # CPU kernels are deterministic for a fixed thread count
    model = Phi3(model_cfg)
    model.init_weights(cfg["seed"])
    model.to(device)
    if t["compile"]:
        for block in model.layers:
            block.compile()  # in place: parameter names (and checkpoints) stay the same
    model = wrap(model, world, args.ddp, device)
    optimizer = make_optimizer(model, o["lr"], o["weight_decay"], o["betas"], o["eps"])
    steps_per_phase = [math.ceil(float(ph["tokens"]) / (B * T)) for ph in cfg["phases"]]
    total = sum(steps_per_phase)
    phase_of = [ph for ph, n in zip(cfg["phases"], steps_per_phase) for _ in range(n)]  # step - 1 -> phase
    boundaries = [(sum(steps_per_phase[:i]) * B * T, ph["name"]) for i, ph in enumerate(cfg["phases"])]
    start = 0
    if resumed is not None:
        try:
            checkpointing.restore(*resumed, model, optimizer)
        except model_io.CheckpointError as e:
            fail(f"{resume_from}: {e}")
        start = resumed[0]["step"]
    records = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        records = restart_metrics(metrics_path, start)  # the records up to the checkpoint; later ones are redone
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t["precision"] == "bf16")
    n_micro = B // (mb * world)

    # ---- loop: accumulate micro-batches, clip, step, log, evaluate, checkpoint ---------------------
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, unit="step", disable=rank != 0, dynamic_ncols=True)
    metrics = open(metrics_path, "a") if rank == 0 else None
    t0, tokens_here = time.perf_counter(), 0
    for step in range(start + 1, total + 1):
        phase = phase_of[step - 1]
        lr = lr_at(step, lr=o["lr"], min_lr=o["min_lr"], warmup=o["warmup_steps"], total=total,
                   schedule=o["schedule"], decay_frac=o["decay_frac"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = data.batch(step, phase["mixture"], B, rank, world).to(device)  # (B / world, T + 1)
        loss_sum = torch.zeros((), device=device)
        for i, micro in enumerate(rows.split(mb)):
            with grad_sync(model, i == n_micro - 1), autocast:
                loss = cross_entropy(model(micro[:, :-1]), micro[:, 1:]) / n_micro  # equal token counts: mean of means
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        record = {"step": step, "phase": phase["name"], "loss": mean_across(loss_sum, world), "lr": lr,
                  "tokens": step * B * T, "grad_norm": grad_norm.item()}
        tokens_here += B * T
        phase_end = step == total or phase_of[step] is not phase
        if step % t["eval_every"] == 0 or phase_end:
            record["val"] = evaluate(model, data, mb, rank, world, autocast, device)
        record["tokens_per_s"] = round(tokens_here / (time.perf_counter() - t0), 1)
        if rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            records.append(record)
            bar.set_postfix(phase=phase["name"], loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if "val" in record:
                plot(records, boundaries, out / "loss.png")
        if step % t["checkpoint_every"] == 0 or phase_end:
            checkpointing.save(ckpt_root, step, model, optimizer, keep=t["keep_checkpoints"],
                               loop_state={"tokens": step * B * T, "data_step": step, "phase": phase["name"],
                                           "lr": lr, "config": cfg})
    bar.close()

    # ---- save: the final model as a phikit / Hugging Face checkpoint directory ------------------------
    state = checkpointing.full_model_state(model)
    if rank == 0:
        metrics.close()
        final = Phi3(model_cfg)
        final.load_state_dict(state)
        model_io.save(final, out / "final", tokenizer)
        plot(records, boundaries, out / "loss.png")
        print(f"phikit pretrain: {total} steps, final loss {records[-1]['loss']:.4f}; model in {out / 'final'}",
              file=sys.stderr)
    if world > 1:  # wait for rank 0's final save: a rank that tore down its process group earlier has been
        dist.barrier()  # aborted at exit ("terminate called without an active exception", gloo)
        dist.destroy_process_group()
    return 0


@torch.no_grad()
def evaluate(model, data: MixtureData, micro_batch: int, rank: int, world: int, autocast, device) -> dict:
    """Mean validation loss per source, over the held-out windows of all ranks."""
    out = {}
    for name in data.names:
        batches = data.val_batches(name, micro_batch, rank, world)
        total = torch.zeros(2, device=device)  # (summed loss, windows)
        for x in batches:
            x = x.to(device)
            with autocast:
                total[0] += cross_entropy(model(x[:, :-1]), x[:, 1:]) * len(x)
            total[1] += len(x)
        if world > 1:
            dist.all_reduce(total)
        if total[1] > 0:
            out[name] = (total[0] / total[1]).item()
    return out


if __name__ == "__main__":
    sys.exit(main())
