"""`phikit dpo --config FILE --out DIR [--resume [CKPT]] [--ddp]`: preference optimisation (DPO, IPO), full or LoRA / QLoRA.

The second post-training stage of the Phi-3 report: after SFT, pairs of a chosen and a rejected response
to one prompt (helpfulness, reasoning, and the responsible-AI pairs where the harmful answer is the
rejected one) teach the model which of two answers to prefer. One process, or N under
`torchrun --nproc-per-node N` (FSDP2 by default, DDP with --ddp). The config file (YAML or JSON; paths
relative to the file); every key but `model` and `data.train` has the default shown:

    seed: 0
    model: runs/sft-tiny/final      # the policy's starting point and the reference: anything phikit.load reads
    revision: null                  # hub branch, tag or commit of model
    base_dtype: auto                # as in phikit sft: auto | float32 | bfloat16
    template: null                  # chat template: the tokenizer's own, or a built-in family (phi-3.5, phi-4-mini, ...)
    data:
      train: data/pairs.jsonl       # TRL preference rows, .jsonl or .parquet: {"prompt", "chosen", "rejected"}
                                    # (strings or message lists), or {"chosen", "rejected"} whole conversations
      val: null                     # the same, for the validation metrics
      max_len: 512                  # tokens of prompt + response, for each side of a pair
      overflow: drop                # a longer pair: drop | truncate (both sides cut to max_len)
      packing: true                 # a micro-batch's sequences packed into rows of max_len; false: padded
      group_by_length: true         # batch pairs of similar length (less padding)
      cache_dir: null               # tokenized data cache (default ~/.cache/phikit/sft)
    lora: null                      # or {r: 16, alpha: 32, dropout: 0.05, targets: all-linear, rslora: false}
    dpo:
      loss: sigmoid                 # sigmoid (DPO) | robust (robust DPO) | ipo
      beta: 0.1                     # strength of the pull towards the reference (IPO: its tau)
      label_smoothing: 0.0          # sigmoid: conservative DPO's flip probability; robust: the same for robust DPO
      rpo_alpha: null               # a number adds rpo_alpha x the chosen responses' NLL per token (RPO)
      reference: auto               # auto (LoRA: adapter-off, else copy) | copy: a frozen copy of the start |
                                    # adapter-off: the same weights with the LoRA adapter switched off |
                                    # precomputed: the start's log-probs computed once, stored with the run
    optim: {lr: 1.0e-6, min_lr: 0.0, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8,
            schedule: cosine, warmup_steps: 10, decay_frac: 0.2, grad_clip: 1.0}
    train: {epochs: 1, max_steps: null, batch_size: 16, micro_batch: 4, precision: float32, compile: false,
            threads: null, activation_checkpointing: false, eval_every: 50, checkpoint_every: 50, keep_checkpoints: 2}

batch_size and micro_batch count pairs. The loss of a step is the mean of the per-pair losses over its
pairs (all micro-batches and processes together; the RPO term is a mean over its chosen tokens); the
order of pairs is a function of (seed, epoch), so --resume continues bit for bit. The log-probability
of a response is the sum over its tokens and its end-of-turn token (data/preference.py).

DIR gets metrics.jsonl with TRL's names (loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected; eval_ before each for the validation pairs; also lr,
grad_norm, pairs, tokens, pairs_per_s), loss.png and rewards.png, data.json (what the data stage kept,
skipped and dropped), reference_logps.safetensors with reference: precomputed, checkpoints/step-N, and
final: a full checkpoint, or with LoRA a PEFT adapter directory naming its base.

References: TRL `DPOTrainer` (the numbers; tests/test_dpo.py checks them); Rafailov et al. 2023, "Direct
Preference Optimization" (arXiv 2305.18290); Azar et al. 2023 (IPO, arXiv 2310.12036); Chowdhury et al.
2024 (robust DPO, arXiv 2403.00409); Pang et al. 2024 (RPO, arXiv 2404.19733); the Phi-3 technical report
(arXiv 2404.14219), section 3.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import common, run_parser
from .common import pad_id_for, save_final
from ..data import preference
from ..data.sft import SFTDataError, epoch_batches
from ..train import checkpointing
from ..train.distributed import grad_sync, setup_distributed, wrap
from ..train.losses import IGNORE_INDEX, PREFERENCE_LOSSES, preference_loss, sequence_logps
from ..train.optim import lr_at
from ..train.run_files import plot_losses, plot_metrics, restart_metrics

DEFAULTS = {
    "seed": 0, "model": None, "revision": None, "base_dtype": "auto", "template": None,
    "data": {"train": None, "val": None, "max_len": 512, "overflow": "drop", "packing": True,
             "group_by_length": True, "cache_dir": None},
    "lora": None,
    "dpo": {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": None, "reference": "auto"},
    "optim": {"lr": 1e-6, "min_lr": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
              "schedule": "cosine", "warmup_steps": 10, "decay_frac": 0.2, "grad_clip": 1.0},
    "train": {"epochs": 1, "max_steps": None, "batch_size": 16, "micro_batch": 4, "precision": "float32",
              "compile": False, "threads": None, "activation_checkpointing": False, "eval_every": 50,
              "checkpoint_every": 50, "keep_checkpoints": 2},
}
REFERENCES = ("auto", "copy", "adapter-off", "precomputed")
# what a step logs, as TRL names it; summed over the step's pairs, then divided by their number
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")


def parser() -> argparse.ArgumentParser:
    return run_parser("dpo", __doc__)


def fail(msg: str):
    common.fail("dpo", msg)


def load_config(path: Path) -> dict:
    """The config over DEFAULTS, paths made absolute, values checked; every problem is one line naming the key."""
    cfg = common.load_config("dpo", path, DEFAULTS)
    p = cfg["dpo"]
    if p["reference"] == "auto":
        p["reference"] = "adapter-off" if cfg["lora"] is not None else "copy"
    checks = [(p["loss"] in PREFERENCE_LOSSES, f"dpo.loss must be one of {', '.join(PREFERENCE_LOSSES)}"),
              (float(p["beta"]) > 0, "dpo.beta must be > 0"),
              (0 <= float(p["label_smoothing"]) < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
              (p["loss"] != "ipo" or not p["label_smoothing"], "dpo.label_smoothing does not apply to ipo"),
              (p["rpo_alpha"] is None or float(p["rpo_alpha"]) >= 0, "dpo.rpo_alpha must be >= 0 (or null)"),
              (p["reference"] in REFERENCES, f"dpo.reference must be one of {', '.join(REFERENCES)}"),
              (p["reference"] != "adapter-off" or cfg["lora"] is not None,
               "dpo.reference: adapter-off needs a `lora:` section (without one use copy or precomputed)")]
    for ok, msg in checks:
        if not ok:
            fail(f"{path}: {msg}")
    return cfg


def read_pairs(cfg: dict, tokenizer, split: str) -> preference.PreferenceDataset:
    d = cfg["data"]
    try:
        return preference.load_preference_dataset(d[split], tokenizer, template=cfg["template"],
                                                  max_len=int(d["max_len"]), overflow=d["overflow"],
                                                  cache_dir=d["cache_dir"])
    except (SFTDataError, OSError) as e:
        fail(str(e))


def batch_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probabilities (2P,) of a collated batch's sequences (chosen, then rejected), from logits
    computed at the response positions only."""
    trained = batch["targets"] != IGNORE_INDEX
    logits = model(batch["ids"], input_pos=batch["positions"], segments=batch["segments"], select=trained)
    return sequence_logps(logits, batch["targets"][trained], batch["sequence"][trained], len(batch["tokens"]))


class Reference:
    """log π_ref of a batch's sequences: a frozen copy, the policy with its adapter off, or a stored table."""

    def __init__(self, mode: str, policy, base_model, copy_model=None, tables: dict | None = None):
        self.mode, self.policy, self.base_model, self.copy_model, self.tables = mode, policy, base_model, copy_model, tables

    @torch.no_grad()
    def __call__(self, batch: dict, split: str, pairs: list[int]) -> torch.Tensor:
        if self.mode == "precomputed":
            table = self.tables[split]  # (pairs, 2): chosen, rejected
            return torch.cat([table[pairs, 0], table[pairs, 1]]).to(batch["ids"].device)
        if self.mode == "copy":
            return batch_logps(self.copy_model, batch)
        from ..train.lora import disabled
        with disabled(self.base_model):
            return batch_logps(self.policy, batch)


def precompute(ref: Reference, data: preference.PreferenceDataset, collate, micro_batch: int, rank: int,
               world: int, autocast, device) -> torch.Tensor:
    """(pairs, 2) reference log-probs of every pair of a split, each rank computing its share (FSDP: every rank
    runs the same number of forwards)."""
    from tqdm import tqdm

    n = len(data)
    table = torch.zeros(n, 2, device=device)
    chunks = list(range(0, n, micro_batch * world))
    for start in tqdm(chunks, desc="reference log-probs", unit="batch", disable=rank != 0, file=sys.stderr):
        mine = list(range(start + rank * micro_batch, min(start + (rank + 1) * micro_batch, n)))
        idx = mine or [0]  # a rank with nothing left still runs a forward, and throws it away
        batch = {k: v.to(device) for k, v in collate([data.pairs[j] for j in idx]).items()}
        with autocast:
            logps = ref(batch, "", idx)
        if mine:
            table[mine, 0], table[mine, 1] = logps[:len(mine)], logps[len(mine):]
    if world > 1:
        dist.all_reduce(table)
    return table.cpu()


def batch_loss(cfg: dict, policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, step_pairs: int,
               step_chosen_tokens: torch.Tensor | float | None = None):
    """A micro-batch's share of its step's loss, and the summed metrics (loss, *PAIR_METRICS) of its P pairs.

    policy, reference: log-probs (2P,) of the chosen then rejected responses; tokens (2P,): their lengths.
    The step's loss is the mean per-pair loss over its step_pairs pairs, plus with dpo.rpo_alpha that
    weight times the chosen responses' NLL per token over the step's step_chosen_tokens chosen tokens."""
    losses, sums = pair_terms(cfg, policy, reference, tokens)
    loss = losses.sum() / step_pairs
    if cfg["dpo"]["rpo_alpha"]:
        P = len(policy) // 2
        loss = loss - float(cfg["dpo"]["rpo_alpha"]) * policy[:P].sum() / step_chosen_tokens
    return loss, torch.cat([loss.detach()[None] * step_pairs, sums])


def pair_terms(cfg: dict, policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor):
    """Per-pair losses (P,) and the summed metrics of PAIR_METRICS, for policy/reference log-probs (2P,)."""
    p, P = cfg["dpo"], len(policy) // 2
    losses = preference_loss(p["loss"], (policy[:P], policy[P:]), (reference[:P], reference[P:]), float(p["beta"]),
                             float(p["label_smoothing"]), tokens=(tokens[:P], tokens[P:]))
    with torch.no_grad():  # TRL's rewards: beta * (log pi - log pi_ref) of each response
        r_c, r_r = float(p["beta"]) * (policy[:P] - reference[:P]), float(p["beta"]) * (policy[P:] - reference[P:])
        sums = torch.stack([r_c.sum(), r_r.sum(), (r_c - r_r).sum(), (r_c > r_r).float().sum(),
                            policy[:P].sum(), policy[P:].sum()])
    return losses, sums


def main(argv: list[str] | None = None) -> int:
    # ---- setup: config, base model, reference, adapter, data, optimizer, resume ------------------------------
    args = parser().parse_args(argv)
    cfg = load_config(Path(args.config))
    out, d, t, o, p = Path(args.out), cfg["data"], cfg["train"], cfg["optim"], cfg["dpo"]
    ckpt_root, metrics_path, ref_path = out / "checkpoints", out / "metrics.jsonl", out / "reference_logps.safetensors"
    resume = common.find_resume("dpo", args, cfg, out)  # None, or (checkpoint, what it holds)
    rank, world, device = setup_distributed()
    B, mb = t["batch_size"], t["micro_batch"]
    if B % (mb * world):
        fail(f"train.batch_size ({B}) must be a multiple of micro_batch * processes ({mb} * {world})")
    if args.threads or t["threads"]:
        torch.set_num_threads(args.threads or t["threads"])
    model, tokenizer = common.load_base("dpo", cfg)
    pad_id = pad_id_for(tokenizer)
    train = read_pairs(cfg, tokenizer, "train")
    val = read_pairs(cfg, tokenizer, "val") if d["val"] else None
    if len(train) < B:
        fail(f"{d['train']}: {len(train)} pairs left after checks (counts: {train.stats}), fewer than one batch "
             f"of train.batch_size = {B}")
    copy_model = None
    if p["reference"] == "copy":  # the start, frozen; under FSDP2 sharded as the policy is
        copy_model = copy.deepcopy(model).requires_grad_(False).eval().to(device)
        if t["precision"] == "bf16":
            from ..train.lora import cast_frozen_linears
            cast_frozen_linears(copy_model, torch.bfloat16)  # what autocast rounds its weights to anyway
        if world > 1 and not args.ddp:
            copy_model = wrap(copy_model, world, False, device)
    base_model, model, optimizer = common.prepare_training("dpo", model, cfg, world, args.ddp, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t["precision"] == "bf16")
    pack_len = int(d["max_len"]) if d["packing"] else None
    switch = base_model.cfg.original_max_seq_len if base_model.cfg.longrope else None  # one LongRoPE list per row
    collate = functools.partial(preference.collate_pairs, pad_id=pad_id, pack_len=pack_len, longrope_switch=switch)
    ref = Reference(p["reference"], model, base_model, copy_model)
    if p["reference"] == "precomputed":
        ref.tables = reference_tables(ref, ref_path, resume is not None, cfg, train, val, collate, mb, rank,
                                      world, autocast, device)
    steps_per_epoch = len(train) // B
    total = t["max_steps"] or steps_per_epoch * t["epochs"]
    start = common.restore("dpo", resume, model, optimizer)
    records = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps({"train": train.stats, "val": val.stats if val else {},
                                                   "pad_id": pad_id}, indent=1) + "\n")
        records = restart_metrics(metrics_path, start)
        s = train.stats
        print(f"phikit dpo: {s['kept']} of {s['rows']} train pairs kept (identical {s['identical']}, dropped too long "
              f"{s['dropped_too_long']}, truncated {s['truncated']}, no response token {s['dropped_no_target']}); "
              f"{total} steps of {B} pairs; reference: {p['reference']}", file=sys.stderr)
    order = functools.lru_cache(maxsize=2)(
        lambda epoch: epoch_batches(train.lengths, B, cfg["seed"], epoch, d["group_by_length"]))

    # ---- loop: accumulate micro-batches, clip, step, log, evaluate, checkpoint ---------------------------------
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, unit="step", disable=rank != 0, dynamic_ncols=True)
    metrics = open(metrics_path, "a") if rank == 0 else None
    t0, pairs_here = time.perf_counter(), 0
    for step in range(start + 1, total + 1):
        epoch, i = divmod(step - 1, steps_per_epoch)
        lr = lr_at(step, lr=o["lr"], min_lr=o["min_lr"], warmup=o["warmup_steps"], total=total,
                   schedule=o["schedule"], decay_frac=o["decay_frac"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order(epoch)[i]  # pair indices of this step's global batch
        per_rank = B // world
        micros = [batch[rank * per_rank + k:rank * per_rank + k + mb] for k in range(0, per_rank, mb)]
        collated = [collate([train.pairs[j] for j in idx]) for idx in micros]
        chosen_tokens = torch.tensor(float(sum(int(c["tokens"][:len(idx)].sum()) for c, idx in zip(collated, micros))),
                                     device=device)
        if world > 1:
            dist.all_reduce(chosen_tokens)  # the RPO term is a mean over the chosen tokens of every process
        sums = torch.zeros(len(PAIR_METRICS) + 1, device=device)  # loss, then PAIR_METRICS
        for k, (idx, m) in enumerate(zip(micros, collated)):
            m = {key: v.to(device) for key, v in m.items()}
            with autocast:
                reference = ref(m, "train", idx)
            with grad_sync(model, k == len(micros) - 1), autocast:
                policy = batch_logps(model, m)
            loss, batch_sums = batch_loss(cfg, policy, reference, m["tokens"], B, chosen_tokens.clamp(min=1))
            (loss * world).backward()  # DDP and FSDP average gradients over processes; the sum is wanted
            sums += batch_sums
        grad_norm = torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], o["grad_clip"])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(sums)
        pairs_here += B
        record = {"step": step, "epoch": epoch + 1, **named(sums / B, ""), "lr": lr, "grad_norm": grad_norm.item(),
                  "pairs": step * B}
        if val is not None and (step % t["eval_every"] == 0 or step == total):
            record.update(evaluate(cfg, model, ref, val, collate, mb, rank, world, autocast, device))
        record["pairs_per_s"] = round(pairs_here / (time.perf_counter() - t0), 2)
        if rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['rewards/accuracies']:.2f}",
                            margin=f"{record['rewards/margins']:.2f}", pairs_s=f"{record['pairs_per_s']:.1f}")
            bar.update()
            if "eval_loss" in record:
                plot(records, out)
        if step % t["checkpoint_every"] == 0 or step == total:
            checkpointing.save(ckpt_root, step, model, optimizer, keep=t["keep_checkpoints"],
                               trainable_only=cfg["lora"] is not None, loop_state={"epoch": epoch + 1, "config": cfg})
    bar.close()

    # ---- save: a PEFT adapter directory (LoRA) or a full checkpoint ------------------------------------------
    final = common.gathered_final("dpo", cfg, model, world, args.ddp, base_model)
    if rank == 0:
        metrics.close()
        save_final(final, cfg, tokenizer, out / "final")
        plot(records, out)
        last = records[-1] if records else {"loss": float("nan"), "rewards/accuracies": float("nan")}
        print(f"phikit dpo: {total} steps, final loss {last['loss']:.4f}, reward accuracy "
              f"{last['rewards/accuracies']:.2f}" + (f", validation {last['eval_rewards/accuracies']:.2f}"
                                                    if "eval_rewards/accuracies" in last else "")
              + f"; model in {out / 'final'}", file=sys.stderr)
    if world > 1:  # wait for rank 0's final save before tearing the process group down
        dist.barrier()
        dist.destroy_process_group()
    return 0


def named(values: torch.Tensor, prefix: str) -> dict:
    """{prefix + name: value} for (loss, *PAIR_METRICS)."""
    return {prefix + k: v for k, v in zip(("loss",) + PAIR_METRICS, values.tolist())}


def reference_tables(ref: Reference, path: Path, resuming: bool, cfg: dict, train, val, collate, mb: int,
                     rank: int, world: int, autocast, device) -> dict:
    """{split: (pairs, 2)} reference log-probs: computed now with the starting weights and stored in the run
    directory, or (resuming) read back from it, so that a resumed run uses the very same numbers."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    splits = {"train": train, **({"val": val} if val is not None else {})}
    prints = {s: fingerprint(data) for s, data in splits.items()}
    if resuming:
        try:
            tables = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                stored = json.loads((f.metadata() or {}).get("data", "{}"))
        except Exception as e:  # safetensors raises its own error types
            fail(f"--resume: {path} cannot be read ({e}); the reference log-probs of this run are lost")
        if stored != prints or any(tables.get(s, torch.empty(0)).shape != (len(data), 2) for s, data in splits.items()):
            fail(f"--resume: {path} was computed for other pairs (was the data, the tokenizer or max_len changed?)")
        return tables
    # the start: the policy before any step (LoRA: with its adapter off, which is the same thing at B = 0)
    start = Reference("adapter-off", ref.policy, ref.base_model) if cfg["lora"] is not None else \
        Reference("copy", ref.policy, ref.base_model, copy_model=ref.policy)
    ref.policy.eval()
    tables = {s: precompute(start, data, collate, mb, rank, world, autocast, device) for s, data in splits.items()}
    ref.policy.train()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({s: v.contiguous() for s, v in tables.items()}, str(tmp),
                  metadata={"model": str(cfg["model"]), "data": json.dumps(prints)})
        tmp.replace(path)
    return tables


def fingerprint(data: preference.PreferenceDataset) -> str:
    """sha256 of a split's tokenized pairs: a stored reference table belongs to exactly these."""
    h = hashlib.sha256()
    for pair in data.pairs:
        for t in pair:
            h.update(t.numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()


@torch.no_grad()
def evaluate(cfg: dict, model, ref: Reference, val, collate, micro_batch: int, rank: int, world: int, autocast,
             device) -> dict:
    """eval_loss and eval_<PAIR_METRICS> over every validation pair, dealt round-robin to the ranks; every rank runs
    the same number of forwards (FSDP needs it: a rank short of pairs runs a dummy one and drops it). eval_loss is
    the step's loss over the whole set: the mean per-pair loss, plus the RPO term over all chosen tokens."""
    model.eval()
    mine = list(range(rank, len(val), world))
    forwards = -(-len(range(0, len(val), world)) // micro_batch)  # rank 0 has the most pairs
    sums = torch.zeros(len(PAIR_METRICS) + 4, device=device)  # pair losses, PAIR_METRICS, pairs, chosen logp, tokens
    for k in range(0, forwards * micro_batch, micro_batch):
        idx = mine[k:k + micro_batch]
        m = {key: v.to(device) for key, v in collate([val.pairs[j] for j in idx or [0]]).items()}
        with autocast:
            policy, reference = batch_logps(model, m), ref(m, "val", idx or [0])
        if idx:
            losses, pair_sums = pair_terms(cfg, policy, reference, m["tokens"])
            P = len(idx)
            sums += torch.cat([losses.sum()[None], pair_sums,
                               torch.stack([torch.tensor(float(P), device=device), policy[:P].sum(),
                                            m["tokens"][:P].sum().float()])])
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    pairs, chosen_logp, chosen_tokens = sums[-3].clamp(min=1), sums[-2], sums[-1].clamp(min=1)
    values = sums[:-3] / pairs
    if cfg["dpo"]["rpo_alpha"]:
        values[0] = values[0] - float(cfg["dpo"]["rpo_alpha"]) * chosen_logp / chosen_tokens
    return named(values, "eval_")


def plot(records: list[dict], out: Path) -> None:
    """loss.png (train and validation loss) and rewards.png (reward margins and accuracies)."""
    plot_losses(records, out / "loss.png", val={"validation": [(r["step"], r["eval_loss"]) for r in records
                                                               if "eval_loss" in r]})
    plot_metrics(records, out / "rewards.png", [("rewards/margins", "reward margin (chosen - rejected)"),
                                                ("rewards/accuracies", "reward accuracy")])


if __name__ == "__main__":
    sys.exit(main())
