"""`phikit generate`: complete one prompt and print only the completion on stdout."""

from __future__ import annotations

import argparse
import sys
import time

from ..cli import (add_model_args, add_sampling_args, add_speculate_args, context_problem, decode_fn_from, drafter_from,
                   load_from, sampling_from)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phikit generate",
        description="Complete a prompt and print the completion (only) on stdout. With --chat the prompt is "
                    "sent as a user message through the model's chat template.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (default: raw completion)")
    p.add_argument("--system", default=None, help="system message, with --chat (default: none)")
    add_sampling_args(p)
    add_speculate_args(p)
    p.add_argument("--verbose", action="store_true",
                   help="print token counts, speed and the drafts' acceptance rate on stderr (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sampling = sampling_from(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    t0 = time.perf_counter()
    model, tokenizer = load_from(args)
    drafter = drafter_from(args, model, tokenizer)
    t_load = time.perf_counter() - t0

    from ..chat_format import encode_chat, stop_ids
    from ..generate import stream_text

    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        ids = encode_chat(messages, tokenizer)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    if not ids:
        sys.exit("phikit: the prompt encodes to no tokens")
    problem = context_problem(args, model, 1, len(ids) + args.max_new_tokens)
    if problem:
        sys.exit(f"phikit: {problem}")
    stats: dict = {}
    t0 = time.perf_counter()
    first = None
    for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, sampling, stop_ids(tokenizer),
                             args.stop, stats=stats, decode_fn=decode_fn_from(args, model), speculate=drafter,
                             show_special=args.show_special):
        first = first or time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        dt = time.perf_counter() - t0
        n = stats.get("completion_tokens", 0)
        print(f"[phikit] load {t_load:.2f}s | prompt {len(ids)} tokens | {n} new tokens in {dt:.2f}s "
              f"({n / dt:.1f} tok/s incl. prefill) | finish: {stats.get('finish_reason')}", file=sys.stderr)
        if drafter is not None:
            print(f"[phikit] {drafter.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
