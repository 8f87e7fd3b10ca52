"""`phikit <command>` / `python -m phikit <command>`: a table of commands, each imported only when run."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("phikit.commands.generate", "complete a prompt (or one chat turn) and print the completion"),
    "chat": ("phikit.commands.chat", "interactive multi-turn chat with streaming output"),
    "quantize": ("phikit.commands.quantize", "quantize weights to 4 or 8 bits (with a quality gate)"),
    "convert": ("phikit.commands.convert", "convert a checkpoint to GGUF (llama.cpp) or a Hugging Face directory"),
    "serve": ("phikit.commands.serve", "serve a model over an OpenAI-compatible HTTP API with continuous batching"),
    "data": ("phikit.commands.data", "data pipeline: ingest, dedup, score, filter, tokenizer, pack (see --help)"),
    "pretrain": ("phikit.recipes.pretrain", "pretrain from scratch on token shards (phases, resume, FSDP/DDP)"),
    "sft": ("phikit.recipes.sft", "supervised fine-tuning on chat data, full or LoRA / QLoRA (resume, FSDP/DDP)"),
    "dpo": ("phikit.recipes.dpo", "preference optimisation (DPO, IPO) on chosen/rejected pairs, full or LoRA (resume, FSDP/DDP)"),
    "eval": ("phikit.commands.eval", "evaluate: MMLU, HumanEval, math, perplexity, safety, local and lm-eval tasks"),
    "lora": ("phikit.commands.lora", "LoRA adapters: convert fused <-> split names, merge into a checkpoint"),
}


def usage() -> str:
    lines = ["usage: phikit <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'phikit <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"phikit: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
