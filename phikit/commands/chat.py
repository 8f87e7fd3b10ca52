"""`phikit chat`: an interactive multi-turn chat in the terminal, streaming the replies.

Each turn re-renders the whole conversation through the chat template and generates the reply
(the KV cache is not kept across turns: simple and always consistent, at the cost of re-reading
the history once per turn).
"""

from __future__ import annotations

import argparse
import sys

from ..cli import (add_model_args, add_sampling_args, add_speculate_args, context_problem, decode_fn_from, drafter_from,
                   load_from, sampling_from)

HELP = "commands: /reset clears the conversation, /exit quits (Ctrl-D too)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phikit chat", description="Chat with a model in the terminal. " + HELP + ".")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation (default: none)")
    add_sampling_args(p, temperature=0.0)
    add_speculate_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sampling = sampling_from(args)
    model, tokenizer = load_from(args)
    drafter = drafter_from(args, model, tokenizer)

    from ..chat_format import encode_chat, stop_ids
    from ..generate import stream_text

    stops = stop_ids(tokenizer)
    decode = decode_fn_from(args, model)  # compiled once, reused by every turn
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"phikit chat: {args.model}. {HELP}.", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(opening)
            print("[conversation cleared]", file=sys.stderr)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = encode_chat(messages, tokenizer)
        problem = context_problem(args, model, 1, len(ids) + args.max_new_tokens)
        if problem:  # the turn is dropped; /reset starts a shorter conversation
            messages.pop()
            print(f"[{problem}; /reset clears the conversation]", file=sys.stderr)
            continue
        reply = []
        for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, sampling, stops, args.stop,
                                 decode_fn=decode, speculate=drafter, show_special=args.show_special):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
