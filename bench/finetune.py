"""Fine-tuning speed and memory: LoRA SFT, phikit against transformers + PEFT, and DPO, phikit against TRL.

    python bench/finetune.py --shapes small             # a 60M-parameter Phi-3-shaped model, a few minutes
    python bench/finetune.py --shapes 3.8b --steps 3    # Phi-3-mini's shape: bf16 base, and int4 for phikit
    python bench/finetune.py --reps 3 --json out.json
    python bench/finetune.py --shapes small --tasks sft,dpo   # also the DPO rows (pairs/s, against TRL)
    python bench/finetune.py --shapes 300m --tasks dpo  # LoRA-DPO's memory against full DPO's, weights dominating

Both sides run the same LoRA training step on the same checkpoint (random weights, saved once in
--cache in the Hugging Face layout, which transformers and phikit both read) and the same random
token batch, shaped like SFT data: each row a prompt (its first half, untrained) and a response (the
second half, trained): forward, cross-entropy over the trained tokens, backward into the adapter,
AdamW on the adapter. transformers computes logits at every position and masks the prompt's labels
with -100; phikit, as `phikit sft` does, computes them at the trained positions only. Same rank, alpha, targets (all-linear: qkv_proj, o_proj, gate_up_proj, down_proj), sequence
length, batch, threads and precision:

    small  dim 512, 8 layers, ffn 1536, vocab 32064 (61M parameters): float32 base, bf16 autocast
           (transformers' best CPU setting) on both sides; sequence 512, batch 4
    3.8b   Phi-3-mini-4k (3.8B): a bf16 base on both sides, activation checkpointing on both sides
           (transformers' gradient_checkpointing_enable, phikit's train.activation_checkpointing);
           sequence 512, batch 1; phikit also with its int4 checkpoint as the base (QLoRA)
    300m   dim 1024, 16 layers, ffn 4096, vocab 32064 (334M parameters): as small; for DPO's memory, where
           the weights (1.3 GB in float32) outweigh PyTorch's import floor (0.25 GiB)

transformers + PEFT is the plain loop of their docs: `get_peft_model(model, LoraConfig(...))`, the
model's own loss from `labels`, with its default attention (SDPA) and with `attn_implementation="eager"`
(faster in bf16 on some CPUs: bench/train.py); ratios are to the default. phikit is what `phikit sft` runs: `apply_lora`, the model's logits,
`train.losses.cross_entropy`. Each measurement is a fresh process (so peak RSS, VmHWM, is its own:
weights, activations, optimizer); the first step is warm-up, tokens/s is the median of the others.
Repetitions go round the engines (A B A B), and the table gives the median and the ratio to
transformers + PEFT.

DPO rows (--tasks dpo): phikit's DPO step against TRL's `DPOTrainer` on the same checkpoint and the same
synthetic pairs (4 pairs per step, each a 64-token prompt and two 64-token responses, random ids: DPO_PAIRS,
DPO_PROMPT, DPO_RESPONSE), sigmoid loss, beta 0.1, the shape's precision and threads, dropout off:

    LoRA   the SFT rows' adapter (rank, alpha, targets); the reference is the policy with the adapter off
           (TRL: `peft_config=LoraConfig(...)`, ref_model=None: it disables the adapter for the reference;
           a ready PeftModel would get a second, "ref" adapter instead)
    full   every weight trains (float32 master weights, AdamW state); the reference is a frozen copy of the
           start (TRL: ref_model=None, its own copy loaded from the checkpoint; phikit: a deepcopy, its linear
           weights in bf16 under bf16 autocast, as `phikit dpo` does). Only on float32-base shapes.

phikit runs what `phikit dpo` runs per micro-batch (recipes/dpo.py): `collate_pairs` (packed into rows of
data.max_len = 512, the recipe's default), the reference's log-probs under no_grad (`Reference`),
`batch_logps`, `batch_loss`, backward, its fused AdamW (`make_optimizer`). TRL is a plain loop over its
parts rather than `trainer.train()`: its `DataCollatorForPreference` on pre-tokenized pairs,
`trainer.compute_loss` (policy and reference, its fused LM head), backward, the optimizer its `train()`
would make (`create_optimizer`: fused AdamW). No gradient clipping on either side. pairs/s is the median
over the timed steps; ratios are to TRL at the same setting, and a last line per shape gives phikit's
LoRA-DPO peak RSS over its full DPO's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (Config overrides of phi-3-mini-4k-instruct, seq, batch, base dtype, autocast bf16, checkpointing)
    "small": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1536, sliding_window=None),
              512, 4, "float32", True, False),
    "3.8b": (dict(sliding_window=None), 512, 1, "bfloat16", False, True),
    "300m": (dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=4096, sliding_window=None),
             512, 4, "float32", True, False),
}
RANK, ALPHA = 16, 32
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
DPO_PROMPT, DPO_RESPONSE, DPO_PAIRS, DPO_PACK = 64, 64, 4, 512  # tokens, tokens, pairs per step, data.max_len
BETA, DPO_LR = 0.1, 1e-6
DPO_ENGINES = {  # engine -> table label
    "trl-dpo-lora": "TRL DPOTrainer, LoRA",
    "phikit-dpo-lora": "phikit dpo, LoRA",
    "trl-dpo-full": "TRL DPOTrainer, full",
    "phikit-dpo-full": "phikit dpo, full",
}


def prepare(cache: Path, shape: str, int4: bool) -> dict[str, str]:
    """The shape's random checkpoint (and its int4 checkpoint), made once and reused."""
    import torch

    import phikit
    from phikit.config import Config
    from phikit.model import Phi3

    overrides, _, _, dtype, _, _ = SHAPES[shape]
    src = cache / f"finetune-{shape}"
    if not (src / "config.json").exists():
        cfg = Config.from_name("phi-3-mini-4k-instruct", torch_dtype=dtype, **overrides)
        default = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: no float32 copy of a 3.8B model
        try:
            with torch.device("meta"):
                model = Phi3(cfg)
            model = model.to_empty(device="cpu")
        finally:
            torch.set_default_dtype(default)
        model.init_weights(seed=0)
        phikit.save(model, src)
        del model
    paths = {"base": str(src)}
    if int4:
        q = cache / f"finetune-{shape}-int4"
        if not (q / "config.json").exists():
            subprocess.run([sys.executable, "-m", "phikit", "quantize", "--model", str(src), "--bits", "4",
                            "--group-size", "32", "--out", str(q)], check=True)
        paths["int4"] = str(q)
    return paths


# ---- one measurement, in a child process ----------------------------------------------------------------

def _batch(vocab: int, seq: int, batch: int):
    import torch
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))


def _peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def worker(engine: str, model_dir: str, shape: str, steps: int, threads: int, compile_: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, seq, batch, dtype, autocast_bf16, ckpt = SHAPES[shape]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16)
    if engine.startswith("transformers+peft"):
        from peft import LoraConfig, get_peft_model
        from transformers import Phi3ForCausalLM

        attn = "eager" if engine.endswith("eager") else "sdpa"  # its default, and its bf16-faster eager attention
        model = Phi3ForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation=attn)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=TARGETS))
        vocab = model.config.vocab_size

        def loss_of(x):
            labels = x[:, :-1].clone()  # transformers shifts the labels itself: label t is predicted at t - 1
            labels[:, :seq // 2 + 1] = -100  # the same trained tokens as phikit's targets below
            return model(input_ids=x[:, :-1], labels=labels).loss
    else:
        import phikit
        from phikit.recipes.common import checkpoint_blocks
        from phikit.train.lora import apply_lora, cast_frozen_linears
        from phikit.train.losses import IGNORE_INDEX, cross_entropy

        model, _ = phikit.load(model_dir)
        apply_lora(model, TARGETS, r=RANK, alpha=ALPHA)
        if autocast_bf16:  # what `phikit sft` does under bf16 autocast: the same bf16 numbers, cast once
            cast_frozen_linears(model, torch.bfloat16)
        if ckpt:
            checkpoint_blocks(model)
        if compile_:  # train.compile: true
            for block in model.layers:
                block.compile()
        vocab = model.cfg.vocab_size

        def loss_of(x):  # recipes/sft.py's summed_loss, over the trained positions only
            targets = x[:, 1:].clone()
            targets[:, :seq // 2] = IGNORE_INDEX
            trained = targets != IGNORE_INDEX
            logits = model(x[:, :-1], select=trained)
            return cross_entropy(logits[None], targets[trained][None], reduction="sum") / trained.sum()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = _batch(vocab, seq, batch)
    times, losses = [], []
    for _ in range(steps + 1 + compile_):  # warm-up: one step, two when compiling (forward, then backward graphs)
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    tokens = seq * batch
    timed = times[1 + compile_:]
    return {"engine": engine, "shape": shape, "tokens_per_s": tokens / statistics.median(timed), "step_s": timed, "loss": losses, "peak_rss_gib": _peak_rss_gib(),
            "trainable": sum(p.numel() for p in params)}


# ---- one DPO measurement, in a child process ------------------------------------------------------------

def _pairs(vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """DPO_PAIRS synthetic pairs of fixed lengths: (prompt, chosen, rejected) token ids."""
    import torch
    rows = torch.randint(1, vocab, (DPO_PAIRS, DPO_PROMPT + 2 * DPO_RESPONSE),
                         generator=torch.Generator().manual_seed(0)).tolist()
    return [(r[:DPO_PROMPT], r[DPO_PROMPT:DPO_PROMPT + DPO_RESPONSE], r[DPO_PROMPT + DPO_RESPONSE:]) for r in rows]


def _hf_tokenizer():
    """A tiny tokenizer for TRL's constructor (it tokenizes a dummy dataset and takes the pad id from it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def dpo_worker(engine: str, model_dir: str, shape: str, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, _, _, dtype, autocast_bf16, ckpt = SHAPES[shape]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16)
    lora = engine.endswith("lora")
    if engine.startswith("trl"):
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import Phi3ForCausalLM
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        model = Phi3ForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        tokenizer = _hf_tokenizer()
        out_dir = tempfile.TemporaryDirectory(prefix="bench-dpo-")  # nothing is saved there (save_strategy="no")
        args = DPOConfig(output_dir=out_dir.name, beta=BETA, loss_type=["sigmoid"],
                         learning_rate=DPO_LR, per_device_train_batch_size=DPO_PAIRS, gradient_checkpointing=ckpt,
                         bf16=False, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
        peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=TARGETS) if lora else None
        dummy = Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" a"]})
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dummy, processing_class=tokenizer,
                             peft_config=peft_config)  # LoRA: reference = adapter off; full: its own copy
        torch.set_num_threads(threads)
        model = trainer.model
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
        examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in _pairs(model.config.vocab_size)]
        optimizer = trainer.create_optimizer()

        def loss_of():
            batch = collator(examples)
            with autocast:
                return trainer.compute_loss(model, batch)
    else:
        import phikit
        from phikit.data.preference import collate_pairs
        from phikit.recipes.common import checkpoint_blocks
        from phikit.recipes.dpo import Reference, batch_logps, batch_loss
        from phikit.train.losses import IGNORE_INDEX
        from phikit.train.lora import apply_lora, cast_frozen_linears
        from phikit.train.optim import make_optimizer

        model, _ = phikit.load(model_dir, dtype=None if lora else torch.float32)  # recipes/common.load_base
        copy_model = None
        if lora:  # recipes/common.add_lora
            apply_lora(model, TARGETS, r=RANK, alpha=ALPHA)
            if autocast_bf16:
                cast_frozen_linears(model, torch.bfloat16)
        else:  # recipes/dpo.main, reference: copy
            copy_model = copy.deepcopy(model).requires_grad_(False).eval()
            if autocast_bf16:
                cast_frozen_linears(copy_model, torch.bfloat16)
        model.train()
        if ckpt:
            checkpoint_blocks(model)
        ref = Reference("adapter-off" if lora else "copy", model, model, copy_model)
        optimizer = make_optimizer(model, DPO_LR, 0.0, (0.9, 0.999), 1e-8)
        cfg = {"dpo": {"loss": "sigmoid", "beta": BETA, "label_smoothing": 0.0, "rpo_alpha": None}}

        def side(prompt, response):  # data/preference.py's (ids, targets): the response's tokens trained
            ids = torch.tensor(prompt + response, dtype=torch.int32)
            targets = torch.full_like(ids, IGNORE_INDEX)
            targets[len(prompt) - 1:-1] = ids[len(prompt):]
            return ids, targets
        pairs = [(*side(p, c), *side(p, r)) for p, c, r in _pairs(model.cfg.vocab_size)]

        def loss_of():  # recipes/dpo.main's micro-batch
            m = collate_pairs(pairs, pad_id=0, pack_len=DPO_PACK)
            with autocast:
                reference = ref(m, "train", list(range(len(pairs))))
            with autocast:
                policy = batch_logps(model, m)
            return batch_loss(cfg, policy, reference, m["tokens"], len(pairs))[0]
    params = [q for q in model.parameters() if q.requires_grad]
    times, losses = [], []
    for _ in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[1:]
    return {"engine": engine, "shape": shape, "pairs_per_s": DPO_PAIRS / statistics.median(timed), "step_s": timed,
            "loss": losses, "peak_rss_gib": _peak_rss_gib(), "trainable": sum(q.numel() for q in params),
            "threads": torch.get_num_threads()}


# ---- the table ------------------------------------------------------------------------------------------

def measure(engine: str, model_dir: str, shape: str, steps: int, threads: int, label: str) -> dict:
    compile_ = engine == "phikit+compile"
    cmd = [sys.executable, __file__, "--worker", "phikit" if compile_ else engine, "--model-dir", model_dir,
           "--shapes", shape, "--steps", str(steps), "--threads", str(threads)] + (["--compile"] if compile_ else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["label"] = label
    speed = f"{result['pairs_per_s']:.2f} pairs/s" if "pairs_per_s" in result else f"{result['tokens_per_s']:.1f} tok/s"
    print(f"  {shape} {label}: {speed}, peak RSS {result['peak_rss_gib']:.2f} GiB, "
          f"losses {[round(v, 4) for v in result['loss']]}", file=sys.stderr, flush=True)
    return result


def run_engines(engines: list[tuple[str, str, str]], shape: str, args) -> dict[str, list[dict]]:
    """{label: runs}, repetitions going round the engines (A B A B)."""
    results: dict[str, list[dict]] = {label: [] for _, _, label in engines}
    for _ in range(args.reps):
        for engine, model_dir, label in engines:
            results[label].append(measure(engine, model_dir, shape, args.steps, args.threads, label))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="small,3.8b", help="comma-separated: small, 3.8b, 300m (default: small,3.8b)")
    p.add_argument("--tasks", default="sft", help="comma-separated: sft (LoRA SFT against transformers + PEFT), "
                   "dpo (DPO against TRL) (default: sft)")
    p.add_argument("--reps", type=int, default=2, help="fresh-process runs per engine, median taken (default: 2)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run, after one warm-up step (default: 4)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for all (default: 2)")
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache", help="checkpoints (default: bench/.cache)")
    p.add_argument("--json", type=Path, default=None, help="also write every run as JSON here (default: no)")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.worker in DPO_ENGINES:
            result = dpo_worker(args.worker, args.model_dir, args.shapes, args.steps, args.threads)
        else:
            result = worker(args.worker, args.model_dir, args.shapes, args.steps, args.threads, args.compile)
        print(json.dumps(result))
        return
    shapes, tasks = args.shapes.split(","), args.tasks.split(",")
    if unknown := set(shapes) - set(SHAPES):
        raise SystemExit(f"unknown shape {sorted(unknown)[0]!r}; choose from {', '.join(SHAPES)}")
    if unknown := set(tasks) - {"sft", "dpo"}:
        raise SystemExit(f"unknown task {sorted(unknown)[0]!r}; choose from sft, dpo")
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, rank {RANK}, alpha {ALPHA}", file=sys.stderr)
    rows, dpo_rows, memory, runs = [], [], [], []
    for shape in shapes:
        paths = prepare(args.cache, shape, int4=shape == "3.8b" and "sft" in tasks)
        if "sft" in tasks:
            engines = [("transformers+peft", paths["base"], "transformers + PEFT"), ("phikit", paths["base"], "phikit")]
            if shape == "small":  # the 3.8B shape's steps are matmul-bound (and compiling its blocks takes minutes)
                engines[1:1] = [("transformers+peft-eager", paths["base"], "transformers + PEFT, eager attention")]
                engines.append(("phikit+compile", paths["base"], "phikit + compile (train.compile)"))
            if "int4" in paths:
                engines.append(("phikit", paths["int4"], "phikit, int4 base (QLoRA)"))
            results = run_engines(engines, shape, args)
            base_speed = statistics.median(r["tokens_per_s"] for r in results["transformers + PEFT"])
            for label, rs in results.items():
                speed = statistics.median(r["tokens_per_s"] for r in rs)
                rss = statistics.median(r["peak_rss_gib"] for r in rs)
                rows.append((shape, label, speed, speed / base_speed, rss))
                runs += rs
        if "dpo" in tasks:
            # full DPO keeps float32 weights, gradients, AdamW state and a reference: not for a bf16 3.8B base
            kinds = ["lora", "full"] if SHAPES[shape][3] == "float32" else ["lora"]
            engines = [(f"{side}-dpo-{kind}", paths["base"], DPO_ENGINES[f"{side}-dpo-{kind}"])
                       for kind in kinds for side in ("trl", "phikit")]
            results = run_engines(engines, shape, args)
            med = {label: (statistics.median(r["pairs_per_s"] for r in rs),
                           statistics.median(r["peak_rss_gib"] for r in rs)) for label, rs in results.items()}
            for kind in kinds:
                trl_speed = med[DPO_ENGINES[f"trl-dpo-{kind}"]][0]
                for side in ("trl", "phikit"):
                    label = DPO_ENGINES[f"{side}-dpo-{kind}"]
                    reference = "adapter off" if kind == "lora" else "a copy"
                    dpo_rows.append((shape, label, reference, med[label][0], med[label][0] / trl_speed, med[label][1]))
            if "full" in kinds:
                lora_rss, full_rss = med[DPO_ENGINES["phikit-dpo-lora"]][1], med[DPO_ENGINES["phikit-dpo-full"]][1]
                memory.append((shape, lora_rss, full_rss))
            runs += [r for rs in results.values() for r in rs]
    if rows:
        print("\n| shape | engine | tokens/s | vs transformers + PEFT | peak RSS GiB |")
        print("|---|---|---|---|---|")
        for shape, label, speed, ratio, rss in rows:
            print(f"| {shape} | {label} | {speed:.1f} | {ratio:.2f}x | {rss:.2f} |")
    if dpo_rows:
        print(f"\nDPO: {DPO_PAIRS} pairs per step, prompt {DPO_PROMPT} + responses {DPO_RESPONSE} tokens, "
              f"{args.threads} threads")
        print("\n| shape | engine | reference | pairs/s | vs TRL | peak RSS GiB |")
        print("|---|---|---|---|---|---|")
        for shape, label, reference, speed, ratio, rss in dpo_rows:
            print(f"| {shape} | {label} | {reference} | {speed:.2f} | {ratio:.2f}x | {rss:.2f} |")
        for shape, lora_rss, full_rss in memory:
            print(f"\n{shape}: phikit LoRA-DPO (adapter off) peak RSS {lora_rss:.2f} GiB / full DPO (a copy) "
                  f"{full_rss:.2f} GiB = {lora_rss / full_rss:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
