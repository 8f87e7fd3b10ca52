"""`phikit lora convert|merge`: rewrite a LoRA adapter in the other layout, or merge it into its base.

    phikit lora convert --adapter A --to split|fused --out DIR [--base M]
    phikit lora merge --adapter A --out DIR [--model M] [--dtype D]

convert is exact (train/adapters.py): split (q/k/v_proj, gate/up_proj) is what PEFT on transformers'
Llama loads, fused (qkv_proj, gate_up_proj) what it loads on Phi-3; phikit loads both. merge writes a full
checkpoint (phikit.checkpoint.save) whose weights are W + scaling * B @ A, computed in float32.
Errors are one line and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..cli import DTYPES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phikit lora", description="Convert a LoRA adapter (PEFT's format) between the "
                                "fused and split layouts, or merge it into its base model.",
                                epilog="The options of each action, with their defaults: phikit lora convert --help, "
                                       "phikit lora merge --help.")
    sub = p.add_subparsers(dest="action", required=True, metavar="{convert,merge}")
    c = sub.add_parser("convert", help="rewrite an adapter with fused (Phi-3) or split (Llama) module names, exactly",
                       description="Rewrite an adapter with fused (qkv_proj, gate_up_proj) or split (q/k/v_proj, "
                                   "gate/up_proj) module names; the math is unchanged.")
    c.add_argument("--adapter", required=True, metavar="A", help="adapter directory to read (required)")
    c.add_argument("--to", required=True, choices=("split", "fused"), help="layout to write (required)")
    c.add_argument("--out", required=True, metavar="DIR", help="output adapter directory (required)")
    c.add_argument("--base", default=None, metavar="M",
                   help="base checkpoint directory or hub id whose config.json gives the layer shapes "
                        "(default: the adapter's base_model_name_or_path)")
    m = sub.add_parser("merge", help="merge an adapter into its base and write a full checkpoint",
                       description="Merge an adapter into its base model (W + scaling * B @ A in float32) and "
                                   "write a full checkpoint directory.")
    m.add_argument("--adapter", required=True, metavar="A", help="adapter directory to merge (required)")
    m.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (required)")
    m.add_argument("--model", default=None, metavar="M",
                   help="float base checkpoint directory or hub id (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the merged weights (default: auto, the base checkpoint's own)")
    return p


def _base_config(base: str):
    """The Config of a base checkpoint directory or hub id, from its config.json alone (no weights read)."""
    from ..config import Config

    path = Path(base).expanduser()
    if path.is_dir():
        return Config.from_file(path / "config.json")
    from huggingface_hub import hf_hub_download

    return Config.from_file(hf_hub_download(base, "config.json"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..gguf_io import GGUFError
    from ..tokenizer import TokenizerError
    from ..train.adapters import AdapterError, adapter_base, read_adapter

    t0 = time.perf_counter()
    try:
        read_adapter(args.adapter)  # validate before anything is loaded or written
        out = Path(args.out)
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise AdapterError(f"{out} already exists; choose a new output directory (nothing is overwritten)")
        if args.action == "convert":
            out = _convert(args, adapter_base)
        else:
            out = _merge(args, adapter_base)
    except (AdapterError, CheckpointError, ConfigError, GGUFError, TokenizerError, MemoryError, OSError,
            ValueError) as e:
        sys.exit(f"phikit lora: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    print(f"[phikit] wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _convert(args, adapter_base):
    from ..train.adapters import convert_adapter

    base = args.base or adapter_base(args.adapter)
    try:
        cfg = _base_config(base)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the config.json of base {base}: {e}") from None
    return convert_adapter(args.adapter, args.out, args.to, cfg)


def _merge(args, adapter_base):
    from .. import Tokenizer, load
    from ..checkpoint import save
    from ..train.adapters import load_adapter
    from ..train.lora import merge_lora

    base = args.model or adapter_base(args.adapter)
    dtype = DTYPES[args.dtype]
    if dtype is None and str(base).lower().endswith(".gguf"):
        dtype = torch.float32  # a GGUF's quantized tensors would stay quantized: merge into its float form
    model, tokenizer = load(base, dtype=dtype)
    if model.cfg.quantization is not None:
        raise ValueError(f"{base} is quantized: merge the adapter into the float checkpoint, then quantize the result")
    load_adapter(model, args.adapter)
    merge_lora(model)
    if (Path(args.adapter) / "tokenizer.json").exists():  # the adapter's tokenizer (e.g. added tokens) wins
        tokenizer = Tokenizer(args.adapter)
    return save(model, args.out, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
