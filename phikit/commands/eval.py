"""`phikit eval`: benchmarks as the Phi reports run them, through the model's chat template when it has one."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cli import add_model_args, load_from


def parser() -> argparse.ArgumentParser:
    from ..eval.tasks import BUILTIN

    tasks = "\n".join(f"  {k:<14} {v}" for k, v in BUILTIN.items())
    p = argparse.ArgumentParser(
        prog="phikit eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model on benchmark tasks and write results.json, results.png and a table. "
                    "Multiple choice is scored by log-likelihood (each question's context computed once for all "
                    "its options), generation tasks by their extracted answer or, for code, by running it "
                    "against its tests in a sandbox.",
        epilog=f"tasks:\n{tasks}\n\nexample:\n  phikit eval --tasks mmlu --shots 5 --out runs/eval-mmlu")
    add_model_args(p, decoding=False)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory (PEFT's format) applied on top of --model (default: none)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (see below)")
    p.add_argument("--out", required=True, type=Path, help="directory for results.json, results.png and samples")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N questions of each task (default: all)")
    p.add_argument("--shots", type=int, default=0, metavar="K",
                   help="examples shown before each question, from the same task (and MMLU subject) (default: 0)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="prompt through the model's chat template and stop on its end-of-turn tokens (default "
                           "when the checkpoint has a chat template)")
    chat.add_argument("--no-chat", dest="chat", action="store_false",
                      help="plain-text prompts, as for a base model (lm-eval's default), stopping on eos")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every sample's prompt answer and score to samples_<task>.jsonl (default: off)")
    p.add_argument("--judge", default=None, metavar="URL",
                   help="safety: an OpenAI-compatible endpoint (e.g. a `phikit serve` URL) judging each response "
                        "(default: the built-in offline judge, which detects refusals only)")
    p.add_argument("--judge-model", default=None, help="safety: the model name sent to --judge (default: its first)")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="a directory of lm-eval task files (YAML) whose task names --tasks may use (default: none)")
    p.add_argument("--batch-tokens", type=int, default=4096, metavar="N",
                   help="log-likelihood batches hold at most N (padded) tokens (default: 4096)")
    p.add_argument("--gen-batch", type=int, default=8, metavar="N",
                   help="prompts generated together (default: 8)")
    p.add_argument("--math-problems", type=int, default=500, metavar="N",
                   help="problems the math task generates (default: 500)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    from ..eval import tasks as T

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        sys.exit("phikit eval: --tasks is empty")
    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        sys.exit("phikit eval: --shots must be >= 0 and --limit >= 1")
    # every task is built (its data read and checked) and the judge reached before the model loads
    built, lm_eval_names = {}, []
    for name in names:
        try:
            task = T.build(name, math_n=args.math_problems) if name != "safety" else "safety"
        except T.TaskError as e:
            sys.exit(f"phikit eval: {e}")
        if task is None:
            if not _lm_eval_knows(name, args.lm_eval_include):
                sys.exit(f"phikit eval: unknown task {name!r}; known: {T.known_names()}")
            lm_eval_names.append(name)
        else:
            built[name] = task
    judge = _judge(args) if "safety" in built else None

    with torch.no_grad():  # not set_grad_enabled(False): main() also runs inside other programs (the tests)
        return _run(args, built, lm_eval_names, judge)


def _run(args, built: dict, lm_eval_names: list[str], judge) -> int:
    import torch

    from ..eval import tasks as T
    from ..eval.report import table, write

    if args.adapter:
        args.adapter = [args.adapter]
    model, tokenizer = load_from(args)
    model.eval()
    chat = args.chat if args.chat is not None else bool(tokenizer.chat_template)

    from tqdm import tqdm

    from ..eval.run import Evaluator

    bars = []

    def progress(desc: str, total: int):
        bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    ev = Evaluator(model, tokenizer, chat=chat, batch_tokens=args.batch_tokens, gen_batch=args.gen_batch,
                   progress=progress)
    results = {"model": args.model, "adapter": args.adapter[0] if args.adapter else None, "dtype": args.dtype,
               "chat": chat, "shots": args.shots, "limit": args.limit, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tasks": {}}
    samples: dict[str, list[dict]] = {}
    for name, task in built.items():
        try:
            if task == "safety":
                r, s = ev.safety(judge, limit=args.limit)
            else:
                r, s = ev.run(task, shots=args.shots, limit=args.limit)
        except T.TaskError as e:
            sys.exit(f"phikit eval: {e}")
        for bar in bars:
            bar.close()
        bars.clear()
        results["tasks"][name] = r
        samples[name] = s
        write(args.out, results, samples if args.log_samples else None)  # after each task: nothing lost on a crash
    if lm_eval_names:
        from ..eval.lm_eval_tasks import run_lm_eval

        for name, (r, s) in run_lm_eval(model, tokenizer, args.model, lm_eval_names, args.shots, args.limit,
                                        chat, args.lm_eval_include).items():
            results["tasks"][name] = r
            samples[name] = s
    written = write(args.out, results, samples if args.log_samples else None)
    print(table(results))
    print(f"[phikit] wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _lm_eval_knows(name: str, include_path: str | None) -> bool:
    try:
        from ..eval.lm_eval_tasks import task_manager
    except ImportError:  # lm-eval is not installed
        return False
    return name in task_manager(include_path).all_tasks


def _judge(args):
    from ..eval.safety import JudgeUnreachable, make_judge

    try:
        return make_judge(args.judge, model=args.judge_model)
    except JudgeUnreachable as e:
        sys.exit(f"phikit eval: {e}")


if __name__ == "__main__":
    sys.exit(main())
