"""Does a model behave as a chat assistant on held-out prompts? Stop rate, exact answers, held-out loss.

    python examples/check_assistant.py --model runs/sft-tiny/final --data examples/tiny-data/chat/heldout.jsonl
    python examples/check_assistant.py --model runs/tiny/final --data ...      # the base, for comparison

For every `{"prompt", "completion"}` row of --data: the prompt goes through the chat template with the
generation prompt, the model decodes greedily up to --max-new-tokens, and the reply counts as *stopped*
if the model emitted the template's end-of-turn token (`<|end|>`) by itself, and as *exact* if the text
before it is the reference completion. The held-out loss is the mean loss per token of the reference
completions and their end-of-turn token (phikit.data.sft, the loss `phikit sft` trains). Prints one
table row; --json writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import phikit
from phikit.chat_format import encode_chat
from phikit.data import sft as sft_data
from phikit.train.losses import IGNORE_INDEX, cross_entropy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint or adapter directory (anything phikit.load reads)")
    p.add_argument("--data", required=True, help="jsonl of {prompt, completion} rows")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest reply (default: 48)")
    p.add_argument("--batch", type=int, default=16, help="prompts decoded together (default: 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this file (default: no)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = phikit.load(args.model)
    model.eval()
    rows = sft_data.read_rows(args.data)
    eot = sft_data.end_of_turn_id(tokenizer)
    prompts = [encode_chat(r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}],
                           tokenizer) for r in rows]
    stopped = exact = 0
    for start in range(0, len(rows), args.batch):
        chunk = prompts[start:start + args.batch]
        replies: list[list[int]] = [[] for _ in chunk]
        with torch.no_grad():
            for step in phikit.generate(model, chunk, args.max_new_tokens, stop_ids=[eot]):
                for reply, tok in zip(replies, step):
                    if tok is not None:
                        reply.append(tok)
        for reply, row in zip(replies, rows[start:start + args.batch]):
            if reply and reply[-1] == eot:
                stopped += 1
                exact += tokenizer.decode(reply[:-1]).strip() == str(row["completion"]).strip()
    ds = sft_data.load_sft_dataset(args.data, tokenizer, max_len=max(len(x) for x in prompts) + 256)
    total = torch.zeros(2)
    with torch.no_grad():
        for ids, targets in ((torch.as_tensor(e[0])[None], torch.as_tensor(e[1])[None]) for e in ds.examples):
            total[0] += cross_entropy(model(ids.long()), targets.long(), reduction="sum")
            total[1] += (targets != IGNORE_INDEX).sum()
    n = len(rows)
    figures = {"model": args.model, "prompts": n, "stopped": stopped / n, "exact": exact / n,
               "heldout_loss": (total[0] / total[1]).item()}
    print(f"{args.model}: {n} held-out prompts, stopped on end-of-turn {100 * stopped / n:.1f}%, "
          f"exact answers {100 * exact / n:.1f}%, held-out assistant loss {figures['heldout_loss']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
