"""`phikit quantize`: write a 4-bit or 8-bit weight-only quantized checkpoint, gated on quality.

From a safetensors checkpoint the work streams one matrix at a time: each float tensor is read
from the file into a temporary buffer (not memory-mapped, so it leaves no resident pages behind),
quantized and dropped, and peak memory stays near the size of the quantized model plus one
matrix. A GGUF input is loaded whole (it is usually small already).

With --calibrate, the float model first runs on calibration text (phikit's own sample, or a
file) to measure how large each layer's inputs are, and each 4-bit group's scale and min are then
searched to minimise the error weighted by them (calibrate.py, quantize.search_int4) instead of
rounding to nearest.

With --check, the quantized model is compared with the float one on held-out text
(phikit/eval/heldout.txt): perplexity, mean KL divergence and top-1 agreement. It must reach
top-1 >= 99% at 8 bits and >= 90% at 4 bits, or nothing is written (unless --force).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..cli import DTYPES, add_model_args, load_from

GATE = {8: 0.99, 4: 0.90}  # minimum top-1 agreement with the float model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phikit quantize",
        description="Quantize a checkpoint's weights to 4 or 8 bits and write a checkpoint that phikit.load, "
                    "generate, chat and serve read directly.")
    add_model_args(p, decoding=False)
    p.add_argument("--out", required=True, help="output checkpoint directory (required)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits per weight (default: 4)")
    p.add_argument("--group-size", type=int, default=32, choices=(0, 32, 64, 128),
                   help="consecutive weights of a row sharing one fp16 scale; 0 with --bits 8: per channel, one "
                        "scale per row (8.0 bits/weight, activations scaled per token: less accurate) (default: 32)")
    p.add_argument("--symmetric", action="store_true",
                   help="4 bits: symmetric groups, w = (q - 8) * scale, 4.5 bits/weight at group 32 like llama.cpp's "
                        "Q4_0; default: asymmetric, w = q * scale + min, 5 bits/weight like Q4_1 (8 bits are "
                        "always symmetric)")
    p.add_argument("--embedding-bits", type=int, default=8, choices=(4, 8),
                   help="bits of the token embedding table (default: 8)")
    p.add_argument("--keep-8bit", default="lm_head", metavar="NAMES",
                   help="with --bits 4: comma-separated layers kept at 8 bits, e.g. down_proj,lm_head, or 'none' "
                        "(default: lm_head, the output layer, as llama.cpp keeps it at 6 bits)")
    p.add_argument("--calibrate", nargs="?", const="", default=None, metavar="TEXT_FILE",
                   help="4 bits: run the float model on calibration text first (TEXT_FILE, UTF-8, or without it "
                        "phikit's own ~3.9K-token sample, which shares nothing with the --check text) and choose "
                        "each group's scale and min to minimise the error weighted by the mean squared input of "
                        "each channel, instead of rounding to nearest; same format and speed, lower error "
                        "(README: Calibrated 4-bit codes). Costs one pass of the float model over the text "
                        "and a search over every matrix; the float model must fit in RAM, as for --check (default: off)")
    p.add_argument("--check", action="store_true",
                   help="measure perplexity, KL and top-1 agreement against the float model on held-out text, "
                        "and refuse to write a checkpoint that fails the gate (default: off)")
    p.add_argument("--force", action="store_true", help="write even if the --check gate fails (default: off)")
    return p


def quantize_streaming(ckpt: Path, bits: int, group_size: int, symmetric: bool, keep_8bit: tuple[str, ...],
                       dtype: torch.dtype | None, embedding_bits: int = 8,
                       importance: dict[str, torch.Tensor] | None = None):
    """A quantized Phi3 built from an HF safetensors directory, one float matrix in memory at a time
    (importance: calibrate.activation_stats of the float model, for calibrated 4-bit codes)."""
    from tqdm import tqdm

    from ..checkpoint import _weight_files, copying_reader, hf_parts
    from ..config import Config
    from ..model import Phi3
    from ..quantize import QuantLinear, QuantTensor, quantize_model

    cfg = Config.from_file(ckpt / "config.json")
    if cfg.quantization is not None:
        raise ValueError(f"{ckpt} is already quantized ({cfg.quantization})")
    read = copying_reader(_weight_files(ckpt))
    model = Phi3.empty(cfg)
    with torch.device("meta"):  # the structure only: quantized shells on meta hold no memory either
        float_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        quantize_model(model, bits, group_size, symmetric, keep_8bit, embedding_bits, importance)

    def load_float(name: str) -> torch.Tensor:
        if name == "lm_head.weight" and cfg.tie_embeddings:
            name = "embed_tokens.weight"  # tied: quantize the embedding matrix as the output layer too
        parts = [read(hf_name) for hf_name, _ in hf_parts(cfg, name, float_shapes[name])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    state = {}
    modules = dict(model.named_modules())
    for name, module in tqdm(list(modules.items()), desc="quantize", unit="layer", file=sys.stderr):
        if isinstance(module, QuantTensor):  # a quantized shell on meta: fill it from the float matrix
            module = module.to_empty(device="cpu")
            if isinstance(module, QuantLinear) and importance is not None:
                if name not in importance:
                    raise ValueError(f"no calibration statistics for layer {name!r}")
                module.set_weight(load_float(f"{name}.weight"), importance[name])
            else:
                module.set_weight(load_float("embed_tokens.weight" if name == "embed_tokens" else f"{name}.weight"))
            state.update({f"{name}.{b}": buf for b, buf in module.named_buffers()})
            continue
        for pname, _ in module.named_parameters(recurse=False):
            t = load_float(f"{name}.{pname}" if name else pname)
            state[f"{name}.{pname}" if name else pname] = t.to(dtype or t.dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def calibration_ids(tokenizer, text: str | None) -> list[int] | None:
    """The calibration text's token ids (None without --calibrate), checked before any model is loaded."""
    if text is None:
        return None
    if tokenizer is None:
        sys.exit("phikit: --calibrate needs a tokenizer to encode the calibration text")
    ids = tokenizer.encode(text)
    if len(ids) < 64:
        sys.exit(f"phikit: the calibration text is {len(ids)} tokens; give at least 64 (a few thousand is usual)")
    return ids


def calibrate(reference, ids: list[int]) -> dict[str, torch.Tensor]:
    """The float model's activation statistics on the calibration tokens."""
    from ..calibrate import activation_stats

    t = time.perf_counter()
    stats = activation_stats(reference, ids)
    print(f"[phikit] calibration: {len(ids)} tokens through the float model in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.group_size == 0 and args.bits != 8:
        sys.exit("phikit: --group-size 0 (per channel) is for --bits 8; 4 bits need groups of 32, 64 or 128")
    keep = tuple(k.strip() for k in args.keep_8bit.split(",") if k.strip() and k.strip().lower() != "none")
    calibration = None
    if args.calibrate is not None:
        if args.bits != 4:
            sys.exit("phikit: --calibrate searches 4-bit scales; 8-bit weights are rounded to nearest (their error "
                     "is already 1/254 of a group's range)")
        from ..calibrate import calibration_text

        if args.calibrate == "":
            calibration = calibration_text()
        else:
            try:
                calibration = Path(args.calibrate).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                sys.exit(f"phikit: cannot read the calibration text {args.calibrate}: {e}")
    t0 = time.perf_counter()
    from ..checkpoint import resolve, save
    from ..eval.perplexity import compare, heldout_text
    from ..quantize import quantize_model

    src = None if args.model is None or str(args.model).lower().endswith(".gguf") else resolve(args.model,
                                                                                               args.revision)
    if src is not None:  # an HF safetensors directory: stream it
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer(src) if (src / "tokenizer.json").exists() else None
        # calibration and the gate run the float model, memory-mapped: loaded for each and dropped after, so
        # that its pages are not resident while the quantizer streams
        ids = calibration_ids(tokenizer, calibration)
        try:
            importance = None if ids is None else calibrate(load_from(args, need_tokenizer=False)[0], ids)
            model = quantize_streaming(src, args.bits, args.group_size, args.symmetric, keep, DTYPES[args.dtype],
                                       args.embedding_bits, importance)
        except (ValueError, KeyError, OSError) as e:
            sys.exit(f"phikit: {e}")
        reference = load_from(args, need_tokenizer=False)[0] if args.check else None
    else:  # a GGUF file (or the demo model): small enough to hold twice
        import copy

        if args.dtype == "auto":  # a GGUF would load with its quantized tensors kept: quantize the float model
            args.dtype = "bfloat16"
        reference, tokenizer = load_from(args, need_tokenizer=False)
        # the quantized engine runs bf16 activations unless --dtype says otherwise (set above), and the gate
        # compares with the float model in that same dtype
        reference = reference.to(DTYPES[args.dtype])
        ids = calibration_ids(tokenizer, calibration)
        try:
            importance = None if ids is None else calibrate(reference, ids)
        except ValueError as e:
            sys.exit(f"phikit: {e}")
        model = copy.deepcopy(reference)
        quantize_model(model, args.bits, args.group_size, args.symmetric, keep, args.embedding_bits, importance)
    print(f"[phikit] quantized to {args.bits} bits in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    if args.check:
        if tokenizer is None:
            sys.exit("phikit: --check needs a tokenizer to encode the held-out text")
        ids = tokenizer.encode(heldout_text())
        report = compare(reference, model, ids)
        gate = GATE[args.bits]
        ok = report["top1"] >= gate
        print(f"[phikit] held-out {report['tokens']} tokens: perplexity {report['ppl_reference']:.3f} (float) -> "
              f"{report['ppl_candidate']:.3f} (quantized), KL {report['kl']:.4f} nats/token, "
              f"top-1 agreement {100 * report['top1']:.2f}% (gate: >= {100 * gate:.0f}%) -> "
              f"{'pass' if ok else 'FAIL'}", file=sys.stderr)
        if not ok and not args.force:
            sys.exit("phikit: the quantized model fails its quality gate; nothing written (use --force to write "
                     "anyway, or try --keep-8bit down_proj,lm_head / a smaller --group-size)")
    out = save(model, args.out, tokenizer)
    print(f"[phikit] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
