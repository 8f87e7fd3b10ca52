"""Training throughput: phikit pretrain's step vs transformers' Phi3ForCausalLM in a plain PyTorch loop.

    python bench/train.py                                   # model, seq_len and batch of examples/pretrain-tiny.yaml
    python bench/train.py --threads 2 --reps 5 --steps 8

Every variant runs the same optimizer step on the same random token batch: forward over micro-batches,
cross-entropy, backward (gradient accumulation to the config's batch_size), gradient clipping, AdamW.
transformers' Phi3ForCausalLM runs in the loop one writes from its docs (torch.optim.AdamW's defaults),
in float32 and under bf16 autocast (the CPU's bf16 matmuls; weights, gradients and AdamW state stay
float32), each with its default SDPA attention and with attn_implementation="eager" (explicit
matmuls and softmax), which is the faster of the two in bf16 on the CPU. phikit's rows:

    phikit float32          same math, our model and step: fused AdamW (phikit.train.optim), the causal
                            mask as SDPA's is_causal
    phikit bf16             bfloat16 autocast (train.precision: bf16), fp32 weights and state; attention
                            with a backward over short sequences stays float32 (model.attention)
    phikit bf16 + compile   torch.compile of each block (train.compile: true): fused elementwise ops
                            (RMSNorm, RoPE, SwiGLU) and fewer temporaries

Columns: tokens/s (median), the ratio to transformers float32 with its default attention, and the
ratio to the same precision: each row against transformers' default-attention row of its precision,
and against transformers' fastest row of its precision (whichever attention won in this run).

Variants are timed round-robin, `--reps` times each, after warm-up steps (which include compilation);
tokens/s is the median. torch.set_num_threads is the same for all. The machine load is printed before
and after: on a shared machine, compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

from phikit.config import Config
from phikit.model import Phi3
from phikit.train.losses import cross_entropy
from phikit.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def hf_setup(cfg: Config, attention: str = "sdpa"):
    from transformers import Phi3Config, Phi3ForCausalLM

    hf = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = Phi3ForCausalLM(Phi3Config(**hf, attn_implementation=attention)).train()
    return (lambda x: model(input_ids=x).logits), model, torch.optim.AdamW(model.parameters(), lr=1e-3,
                                                                        weight_decay=0.1)


def phikit_setup(cfg: Config, compile_: bool):
    model = Phi3(cfg)
    model.init_weights(0)
    if compile_:
        for block in model.layers:
            block.compile()
    return model, model, make_optimizer(model, 1e-3, 0.1)


def make_step(forward, model, optimizer, batch: torch.Tensor, micro_batch: int, bf16: bool):
    n_micro = len(batch) // micro_batch

    def step():
        for micro in batch.split(micro_batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = cross_entropy(forward(micro[:, :-1]), micro[:, 1:]) / n_micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "pretrain-tiny.yaml",
                   help="pretrain config whose model, seq_len, batch_size and micro_batch are used "
                        "(default: examples/pretrain-tiny.yaml)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every variant (default: the config's, else 1)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per timing (default: 6)")
    p.add_argument("--reps", type=int, default=3, help="timings per variant, median reported (default: 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (default: include it)")
    args = p.parse_args(argv)

    run = yaml.safe_load(args.config.read_text())
    model_kw = {k: v for k, v in run["model"].items() if k != "preset"}
    cfg = Config.from_name(run["model"]["preset"], **{"eos_token_id": 0, "pad_token_id": 0, **model_kw})  # ids < vocab
    T, B, mb = run["data"]["seq_len"], run["train"]["batch_size"], run["train"]["micro_batch"]
    threads = args.threads or run["train"].get("threads") or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1))
    load_before = os.getloadavg()[0]

    variants = {  # name -> (setup, bf16 autocast?)
        "transformers float32": (hf_setup(cfg), False),
        "transformers float32, eager attention": (hf_setup(cfg, "eager"), False),
        "transformers bf16 autocast": (hf_setup(cfg), True),
        "transformers bf16 autocast, eager attention": (hf_setup(cfg, "eager"), True),
        "phikit float32": (phikit_setup(cfg, False), False),
        "phikit bf16 autocast": (phikit_setup(cfg, False), True),
    }
    if not args.no_compile:
        variants["phikit bf16 autocast + torch.compile"] = (phikit_setup(cfg, True), True)
    steps = {name: make_step(*setup, batch, mb, bf16) for name, (setup, bf16) in variants.items()}
    for name, step in steps.items():  # warm-up: allocator, oneDNN primitives, compilation
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * B * T / (time.perf_counter() - t0))

    med = {name: statistics.median(r) for name, r in rates.items()}
    precision = {name: "bf16" if bf16 else "float32" for name, (_, bf16) in variants.items()}
    default = {"float32": med["transformers float32"], "bf16": med["transformers bf16 autocast"]}
    fastest = {p: max(r for name, r in med.items() if name.startswith("transformers") and precision[name] == p)
               for p in default}
    n_params = sum(p.numel() for p in Phi3(cfg).parameters())
    print(f"\nmodel: {cfg.n_layers} layers, dim {cfg.dim}, {n_params / 1e6:.2f}M parameters, vocab {cfg.vocab_size}; "
          f"seq_len {T}, batch {B} x {T} tokens in micro-batches of {mb}; torch {torch.__version__}, "
          f"{threads} thread(s); load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"on {os.cpu_count()} cores\n")
    cols = ("tokens/s", "vs transformers float32", "vs transformers, same precision",
            "vs fastest transformers, same precision")
    print(f"| {'variant':<44} | " + " | ".join(cols) + " |")
    print(f"|{'-' * 46}|" + "|".join("-" * (len(c) + 2) for c in cols) + "|")
    for name, r in med.items():
        p = precision[name]
        cells = (f"{r:,.0f}", f"{r / default['float32']:.2f}x", f"{r / default[p]:.2f}x", f"{r / fastest[p]:.2f}x")
        print(f"| {name:<44} | " + " | ".join(f"{c:>{len(h)}}" for c, h in zip(cells, cols)) + " |")

if __name__ == "__main__":
    main()
