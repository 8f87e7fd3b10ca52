"""`phikit sft --config FILE --out DIR [--resume [CKPT]] [--ddp]`: supervised fine-tuning, full or LoRA / QLoRA.

The first post-training stage of the Phi-3 report: chat-format examples, the loss on the assistant's
tokens. One process, or N under `torchrun --nproc-per-node N` (FSDP2 by default, DDP with --ddp). The
config file (YAML or JSON; relative paths are relative to the file); every key but `model` and
`data.train` has the default shown:

    seed: 0
    model: runs/tiny/final          # the base: checkpoint dir or hub id, .gguf file, phikit int4/int8 checkpoint
                                    # (a path relative to this file or to the working directory, else a hub id)
    revision: null                  # hub branch, tag or commit of model
    base_dtype: auto                # auto (LoRA: the checkpoint's dtype, so a .gguf base keeps its Q4_0/Q4_1/Q8_0
                                    # tensors quantized: QLoRA; full: float32) | float32 | bfloat16
    template: null                  # chat template: the tokenizer's own, or a built-in family (phi-3.5, phi-4-mini, ...)
    data:
      train: data/train.jsonl       # TRL formats, .jsonl or .parquet: {"messages": [...]} or {"prompt", "completion"}
      val: null                     # the same, for the validation loss
      train_on: assistant           # assistant: the loss counts assistant turns (+ their end token) only | all
      max_len: 512                  # tokens per example (and per packed row)
      overflow: drop                # an example longer than max_len: drop | truncate
      packing: true                 # several examples per row, attention confined to each; false: padded batches
      group_by_length: true         # unpacked: batch examples of similar length (less padding)
      cache_dir: null               # tokenized data cache (default ~/.cache/phikit/sft)
    lora: null                      # or {r: 16, alpha: 32, dropout: 0.05, targets: all-linear, rslora: false}
    optim: {lr: 2.0e-5, min_lr: 0.0, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8,
            schedule: cosine, warmup_steps: 10, decay_frac: 0.2, grad_clip: 1.0}
    train: {epochs: 1, max_steps: null, batch_size: 16, micro_batch: 4, precision: float32, compile: false,
            threads: null, activation_checkpointing: false, eval_every: 50, checkpoint_every: 50, keep_checkpoints: 2}

batch_size counts rows (packed rows, or examples) per optimizer step over all processes; an epoch is
len(rows) // batch_size steps, in an order that is a function of (seed, epoch) only, so --resume
continues bit for bit. The loss of a step is the mean over every trained token of the step's rows
(all micro-batches and processes together), so gradient accumulation and the number of processes
do not change it. precision: float32, or bf16 (bfloat16 autocast, float32 trainable weights).

LoRA (`lora:` set) trains only the adapter: the base may be any float model or a phikit int4/int8
checkpoint (QLoRA: the backward goes through the quantized matmul). DIR/final is then a PEFT adapter
directory (adapter_config.json naming the base, adapter_model.safetensors, the tokenizer), which
`phikit generate|chat|serve --model DIR/final` and PEFT's `PeftModel.from_pretrained` load. Without LoRA
every weight trains and DIR/final is a full checkpoint in the base's dtype. DIR also gets
metrics.jsonl (step, epoch, loss, lr, tokens, trained_tokens, grad_norm, tokens_per_s, val_loss at
evaluations), loss.png, data.json (what the data stage kept and dropped) and checkpoints/step-N
(the trainable weights, AdamW state, RNG; train/checkpointing.py).

References: TRL `SFTTrainer` (assistant_only_loss, packing); torchtune `recipes/lora_finetune_single_device.py`;
the Phi-3 technical report (arXiv 2404.14219), section 3 (post-training).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import common, run_parser
from .common import pad_id_for, save_final
from ..data import sft as sft_data
from ..train import checkpointing
from ..train.distributed import grad_sync, setup_distributed
from ..train.losses import IGNORE_INDEX, cross_entropy
from ..train.optim import lr_at
from ..train.run_files import plot_losses, restart_metrics

DEFAULTS = {
    "seed": 0, "model": None, "revision": None, "base_dtype": "auto", "template": None,
    "data": {"train": None, "val": None, "train_on": "assistant", "max_len": 512, "overflow": "drop",
             "packing": True, "group_by_length": True, "cache_dir": None},
    "lora": None,
    "optim": {"lr": 2e-5, "min_lr": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
              "schedule": "cosine", "warmup_steps": 10, "decay_frac": 0.2, "grad_clip": 1.0},
    "train": {"epochs": 1, "max_steps": None, "batch_size": 16, "micro_batch": 4, "precision": "float32",
              "compile": False, "threads": None, "activation_checkpointing": False, "eval_every": 50,
              "checkpoint_every": 50, "keep_checkpoints": 2},
}


def parser() -> argparse.ArgumentParser:
    return run_parser("sft", __doc__)


def fail(msg: str):
    common.fail("sft", msg)


def load_config(path: Path) -> dict:
    """The config over DEFAULTS, paths made absolute, values checked; every problem is one line naming the key."""
    cfg = common.load_config("sft", path, DEFAULTS)
    if cfg["data"]["train_on"] not in ("assistant", "all"):
        fail(f"{path}: data.train_on must be assistant or all")
    return cfg


def load_base(cfg: dict):
    return common.load_base("sft", cfg)


def read_data(cfg: dict, tokenizer, split: str, model_cfg) -> tuple[list, dict]:
    """Rows (packed, or examples) of a split, and the data stage's counts."""
    d = cfg["data"]
    try:
        ds = sft_data.load_sft_dataset(d[split], tokenizer, template=cfg["template"], train_on=d["train_on"],
                                       max_len=int(d["max_len"]), overflow=d["overflow"], cache_dir=d["cache_dir"])
    except (sft_data.SFTDataError, OSError) as e:
        fail(str(e))
    # a LongRoPE model picks one factor list per row: examples past the switch are packed only with each other
    switch = model_cfg.original_max_seq_len if model_cfg.longrope else None
    rows = sft_data.pack(ds.examples, int(d["max_len"]), longrope_switch=switch) if d["packing"] else ds.examples
    return rows, {**ds.stats, "batch_rows": len(rows)}


def main(argv: list[str] | None = None) -> int:
    # ---- setup: config, base model, adapter, data, optimizer, resume ------------------------------------
    args = parser().parse_args(argv)
    cfg = load_config(Path(args.config))
    out, d, t, o = Path(args.out), cfg["data"], cfg["train"], cfg["optim"]
    ckpt_root, metrics_path = out / "checkpoints", out / "metrics.jsonl"
    resume = common.find_resume("sft", args, cfg, out)  # None, or (checkpoint, what it holds)

    rank, world, device = setup_distributed()
    B, mb = t["batch_size"], t["micro_batch"]
    if B % (mb * world):
        fail(f"train.batch_size ({B}) must be a multiple of micro_batch * processes ({mb} * {world})")
    if args.threads or t["threads"]:
        torch.set_num_threads(args.threads or t["threads"])
    model, tokenizer = load_base(cfg)
    eot = sft_data.end_of_turn_id(tokenizer, cfg["template"])
    pad_id = pad_id_for(tokenizer)
    rows, stats = read_data(cfg, tokenizer, "train", model.cfg)
    val_rows, val_stats = read_data(cfg, tokenizer, "val", model.cfg) if d["val"] else ([], {})
    if len(rows) < B:
        fail(f"{d['train']}: {len(rows)} rows after packing/filtering (counts: {stats}), fewer than one batch "
             f"of train.batch_size = {B}")
    base_model, model, optimizer = common.prepare_training("sft", model, cfg, world, args.ddp, device)
    steps_per_epoch = len(rows) // B
    total = t["max_steps"] or steps_per_epoch * t["epochs"]
    start = common.restore("sft", resume, model, optimizer)
    records = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps({"train": stats, "val": val_stats, "end_of_turn_id": eot,
                                                   "pad_id": pad_id}, indent=1) + "\n")
        records = restart_metrics(metrics_path, start)
        print(f"phikit sft: {stats['kept']} of {stats['rows']} train examples kept (dropped too long "
              f"{stats['dropped_too_long']}, truncated {stats['truncated']}, no target {stats['dropped_no_target']})"
              f" -> {len(rows)} rows; {total} steps of {B}", file=sys.stderr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t["precision"] == "bf16")
    lengths = [len(r.ids) if isinstance(r, sft_data.Row) else len(r[0]) for r in rows]
    order = functools.lru_cache(maxsize=2)(
        lambda epoch: sft_data.epoch_batches(lengths, B, cfg["seed"], epoch, d["group_by_length"] and not d["packing"]))

    # ---- loop: accumulate micro-batches, clip, step, log, evaluate, checkpoint -------------------------
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, unit="step", disable=rank != 0, dynamic_ncols=True)
    metrics = open(metrics_path, "a") if rank == 0 else None
    t0, tokens_here = time.perf_counter(), 0
    for step in range(start + 1, total + 1):
        epoch, i = divmod(step - 1, steps_per_epoch)
        lr = lr_at(step, lr=o["lr"], min_lr=o["min_lr"], warmup=o["warmup_steps"], total=total,
                   schedule=o["schedule"], decay_frac=o["decay_frac"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order(epoch)[i]  # row indices of this step's global batch
        per_rank = B // world
        micros = [sft_data.collate([rows[j] for j in batch[rank * per_rank + k:rank * per_rank + k + mb]], pad_id)
                  for k in range(0, per_rank, mb)]
        trained = sum(int((m["targets"] != IGNORE_INDEX).sum()) for m in micros)
        n_trained = torch.tensor(float(trained), device=device)
        if world > 1:
            dist.all_reduce(n_trained)  # the step's loss is a mean over the trained tokens of every process
        loss_sum = torch.zeros((), device=device)
        for k, m in enumerate(micros):
            m = {key: v.to(device) for key, v in m.items()}
            with grad_sync(model, k == len(micros) - 1), autocast:
                loss = summed_loss(model, m) / n_trained.clamp(min=1)
            (loss * world).backward()  # DDP and FSDP average gradients over processes; the sum is wanted
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o["grad_clip"])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
        tokens = sum(int(m["ids"].numel()) for m in micros) * world
        tokens_here += tokens
        record = {"step": step, "epoch": epoch + 1, "loss": loss_sum.item(), "lr": lr,
                  "tokens": (records[-1]["tokens"] if records else 0) + tokens,
                  "trained_tokens": int(n_trained.item()), "grad_norm": grad_norm.item()}
        if val_rows and (step % t["eval_every"] == 0 or step == total):
            record["val_loss"] = evaluate(model, val_rows, mb, pad_id, rank, world, autocast, device)
        record["tokens_per_s"] = round(tokens_here / (time.perf_counter() - t0), 1)
        if rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if "val_loss" in record:
                plot_losses(records, out / "loss.png")
        if step % t["checkpoint_every"] == 0 or step == total:
            checkpointing.save(ckpt_root, step, model, optimizer, keep=t["keep_checkpoints"],
                               trainable_only=cfg["lora"] is not None, loop_state={"epoch": epoch + 1, "config": cfg})
    bar.close()

    # ---- save: a PEFT adapter directory (LoRA) or a full checkpoint ------------------------------------------
    final = common.gathered_final("sft", cfg, model, world, args.ddp, base_model)
    if rank == 0:
        metrics.close()
        save_final(final, cfg, tokenizer, out / "final")
        plot_losses(records, out / "loss.png")
        last = records[-1] if records else {"loss": float("nan")}
        print(f"phikit sft: {total} steps, final loss {last['loss']:.4f}"
              + (f", validation {last['val_loss']:.4f}" if "val_loss" in last else "") + f"; model in {out / 'final'}",
              file=sys.stderr)
    if world > 1:  # wait for rank 0's final save: a rank that tore down its process group earlier has been
        dist.barrier()  # aborted at exit ("terminate called without an active exception", gloo)
        dist.destroy_process_group()
    return 0


def summed_loss(model, m: dict) -> torch.Tensor:
    """Summed cross-entropy of a collated micro-batch over its trained tokens; logits are computed for
    those positions only (the output layer's matmul and softmax are a large part of a small model's step)."""
    trained = m["targets"] != IGNORE_INDEX  # (B, T)
    logits = model(m["ids"], input_pos=m["positions"], segments=m["segments"], select=trained)  # (N, V)
    return cross_entropy(logits[None], m["targets"][trained][None], reduction="sum")


@torch.no_grad()
def evaluate(model, rows: list, micro_batch: int, pad_id: int, rank: int, world: int, autocast, device) -> float:
    """Mean loss per trained token over the validation rows of all ranks (rows dealt round-robin; every
    rank runs the same number of forwards, which FSDP needs)."""
    model.eval()
    n = len(rows) // world * world or len(rows)
    mine = rows[rank:n:world] if n >= world else rows
    total = torch.zeros(2, device=device)  # (summed loss, trained tokens)
    for k in range(0, len(mine), micro_batch):
        m = {key: v.to(device) for key, v in sft_data.collate(mine[k:k + micro_batch], pad_id).items()}
        with autocast:
            total[0] += summed_loss(model, m)
        total[1] += (m["targets"] != IGNORE_INDEX).sum()
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item() if total[1] > 0 else math.nan


if __name__ == "__main__":
    sys.exit(main())
