"""LoRA fine-tuning speed and memory: phikit against transformers + PEFT, same model, data and settings.

    python bench/finetune.py --shapes small             # a 60M-parameter Phi-3-shaped model, a few minutes
    python bench/finetune.py --shapes 3.8b --steps 3    # Phi-3-mini's shape: bf16 base, and int4 for phikit
    python bench/finetune.py --reps 3 --json out.json

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

transformers + PEFT is the plain loop of their docs: `get_peft_model(model, LoraConfig(...))`, the
model's own loss from `labels`, with its default attention (SDPA) and with `attn_implementation="eager"`
(faster in bf16 on some CPUs: bench/train.py); ratios are to the default. phikit is what `phikit sft` runs: `apply_lora`, the model's logits,
`train.losses.cross_entropy`. Each measurement is a fresh process (so peak RSS, VmHWM, is its own:
weights, activations, optimizer); the first step is warm-up, tokens/s is the median of the others.
Repetitions go round the engines (A B A B), and the table gives the median and the ratio to
transformers + PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (Config overrides of phi-3-mini-4k-instruct, seq, batch, base dtype, autocast bf16, checkpointing)
    "small": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1536, sliding_window=None),
              512, 4, "float32", True, False),
    "3.8b": (dict(sliding_window=None), 512, 1, "bfloat16", False, True),
}
RANK, ALPHA = 16, 32


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
                                                 target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
        vocab = model.config.vocab_size

        def loss_of(x):
            labels = x[:, :-1].clone()  # transformers shifts the labels itself: label t is predicted at t - 1
            labels[:, :seq // 2 + 1] = -100  # the same trained tokens as phikit's targets below
            return model(input_ids=x[:, :-1], labels=labels).loss
    else:
        import phikit
        from phikit.recipes.sft import checkpoint_blocks
        from phikit.train.lora import apply_lora, cast_frozen_linears
        from phikit.train.losses import IGNORE_INDEX, cross_entropy

        model, _ = phikit.load(model_dir)
        apply_lora(model, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], r=RANK, alpha=ALPHA)
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
    print(f"  {label}: {result['tokens_per_s']:.1f} tok/s, peak RSS {result['peak_rss_gib']:.2f} GiB, "
          f"losses {[round(v, 4) for v in result['loss']]}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="small,3.8b", help="comma-separated: small, 3.8b (default: small,3.8b)")
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
        print(json.dumps(worker(args.worker, args.model_dir, args.shapes, args.steps, args.threads, args.compile)))
        return
    shapes = args.shapes.split(",")
    if unknown := set(shapes) - set(SHAPES):
        raise SystemExit(f"unknown shape {sorted(unknown)[0]!r}; choose from {', '.join(SHAPES)}")
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, rank {RANK}, alpha {ALPHA}", file=sys.stderr)
    rows, runs = [], []
    for shape in shapes:
        paths = prepare(args.cache, shape, int4=shape == "3.8b")
        engines = [("transformers+peft", paths["base"], "transformers + PEFT"), ("phikit", paths["base"], "phikit")]
        if shape == "small":  # the 3.8B shape's steps are matmul-bound (and compiling its blocks takes minutes)
            engines[1:1] = [("transformers+peft-eager", paths["base"], "transformers + PEFT, eager attention")]
            engines.append(("phikit+compile", paths["base"], "phikit + compile (train.compile)"))
        if "int4" in paths:
            engines.append(("phikit", paths["int4"], "phikit, int4 base (QLoRA)"))
        results: dict[str, list[dict]] = {label: [] for _, _, label in engines}
        for _ in range(args.reps):
            for engine, model_dir, label in engines:
                results[label].append(measure(engine, model_dir, shape, args.steps, args.threads, label))
        base_speed = statistics.median(r["tokens_per_s"] for r in results["transformers + PEFT"])
        for label, rs in results.items():
            speed = statistics.median(r["tokens_per_s"] for r in rs)
            rss = statistics.median(r["peak_rss_gib"] for r in rs)
            rows.append((shape, label, speed, speed / base_speed, rss))
            runs += rs
    print("\n| shape | engine | tokens/s | vs transformers + PEFT | peak RSS GiB |")
    print("|---|---|---|---|---|")
    for shape, label, speed, ratio, rss in rows:
        print(f"| {shape} | {label} | {speed:.1f} | {ratio:.2f}x | {rss:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
