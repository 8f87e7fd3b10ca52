"""`phikit convert`: any loadable checkpoint -> a GGUF file (for llama.cpp / Ollama) or an HF directory."""

from __future__ import annotations

import argparse
import sys
import time

from ..cli import add_model_args, load_from


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phikit convert",
        description="Convert a checkpoint (HF directory, hub id or .gguf file) to a GGUF file that llama.cpp "
                    "runs, or to a Hugging Face safetensors directory. A GGUF's Q4_0/Q4_1/Q8_0 tensors stay as they "
                    "are when written to the same --type; to a Hugging Face directory they are dequantized "
                    "(float32 unless --dtype says otherwise).")
    add_model_args(p, decoding=False)
    p.add_argument("--to", required=True, choices=("gguf", "hf"), help="output format (required)")
    p.add_argument("--out", required=True, help="output .gguf file, or directory for --to hf (required)")
    p.add_argument("--type", default="f16", choices=("f16", "q8_0", "q4_0", "q4_1"),
                   help="GGUF type of the weight matrices; norms stay F32 (default: f16)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.to == "hf" and args.dtype == "auto" and (args.model is None or str(args.model).lower().endswith(".gguf")):
        args.dtype = "float32"  # transformers reads float checkpoints: a GGUF's quantized tensors are dequantized
    model, tokenizer = load_from(args, need_tokenizer=False)  # a GGUF without a tokenizer is still useful

    from ..checkpoint import save
    from ..gguf_io import GGUFError, save_gguf

    try:
        if args.to == "gguf":
            out = save_gguf(model, tokenizer, args.out, args.type)
        else:
            out = save(model, args.out, tokenizer)
    except (GGUFError, OSError) as e:
        sys.exit(f"phikit: {e}")
    print(f"[phikit] wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
