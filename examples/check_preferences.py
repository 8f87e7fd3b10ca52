"""Did preference optimisation move the model's preferences? Reward accuracy and behaviour on held-out pairs.

    python examples/check_preferences.py --model runs/dpo-tiny/final --reference runs/sft-tiny/final \
        --data examples/tiny-data/dpo/heldout.jsonl
    python examples/check_preferences.py --model runs/sft-tiny/final --reference runs/sft-tiny/final --data ...

For every pair of --data (rows of examples/make_dpo_data.py, each with its "kind"):
- *preference accuracy*: the model gives the chosen response a higher log-probability than the rejected
  one (about 50% for a model that has no preference; the SFT model's figure is the "before");
- *reward accuracy* (TRL's rewards/accuracies): the DPO reward of the chosen response beats the
  rejected one's, rewards being beta * (log pi - log pi_ref) against --reference (0% for the reference
  itself, where every margin is 0);
- *behaviour*: the model's greedy reply to the prompt takes the chosen side (refuses a harmful request,
  gets the sum right, names the capital briefly, answers a benign question that only looks risky:
  examples/preference_behaviour.py), and *answered*: a prompt that is not harmful is not refused.
Prints a table per kind; --json writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

import phikit
from phikit.chat_format import encode_chat
from phikit.data import preference
from phikit.data.sft import end_of_turn_id, read_rows
from phikit.recipes.common import pad_id_for
from phikit.recipes.dpo import batch_logps
from preference_behaviour import classify, prompt_messages


@torch.no_grad()
def pair_logps(model, pairs, pad_id: int, batch: int = 16) -> torch.Tensor:
    """(pairs, 2) summed log-probabilities of each pair's chosen and rejected response."""
    out = []
    for k in range(0, len(pairs), batch):
        chunk = pairs[k:k + batch]
        logps = batch_logps(model, preference.collate_pairs(chunk, pad_id))
        out.append(torch.stack([logps[:len(chunk)], logps[len(chunk):]], 1))
    return torch.cat(out)


@torch.no_grad()
def greedy_replies(model, tokenizer, rows, max_new_tokens: int, batch: int) -> list[str]:
    eot = end_of_turn_id(tokenizer)
    prompts = [encode_chat(prompt_messages(r), tokenizer) for r in rows]
    replies = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ids: list[list[int]] = [[] for _ in chunk]
        for step in phikit.generate(model, chunk, max_new_tokens, stop_ids=[eot]):
            for reply, tok in zip(ids, step):
                if tok is not None and tok != eot:
                    reply.append(tok)
        replies += [tokenizer.decode(r).strip() for r in ids]
    return replies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the model to check (anything phikit.load reads)")
    p.add_argument("--reference", required=True, help="the reference of the rewards (the DPO run's starting model)")
    p.add_argument("--data", required=True, help="jsonl of preference rows with a 'kind' (examples/make_dpo_data.py)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the rewards (default: 0.1)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest reply (default: 48)")
    p.add_argument("--batch", type=int, default=16, help="prompts decoded together (default: 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this file (default: no)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = phikit.load(args.model)
    reference, _ = phikit.load(args.reference)
    model.eval(), reference.eval()
    rows = read_rows(args.data)
    ds = preference.load_preference_dataset(args.data, tokenizer, max_len=4096)
    if len(ds) != len(rows):
        raise SystemExit(f"{args.data}: {len(rows) - len(ds)} rows were skipped as identical or too long")
    pad_id = pad_id_for(tokenizer)
    policy, ref = pair_logps(model, ds.pairs, pad_id), pair_logps(reference, ds.pairs, pad_id)
    margins = args.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    replies = greedy_replies(model, tokenizer, rows, args.max_new_tokens, args.batch)
    per_kind = defaultdict(lambda: defaultdict(float))
    for i, (row, reply) in enumerate(zip(rows, replies)):
        took, answered = classify(row["kind"], prompt_messages(row)[-1]["content"], reply, row)
        for kind in (row["kind"], "all"):
            f = per_kind[kind]
            f["pairs"] += 1
            f["preference"] += float(policy[i, 0] > policy[i, 1])
            f["reward"] += float(margins[i] > 0)
            f["behaviour"] += took
            if row["kind"] != "harmful":
                f["answerable"] += 1
                f["answered"] += answered
    figures = {"model": args.model, "reference": args.reference, "kinds": {}}
    print(f"{args.model} (rewards against {args.reference}), {len(rows)} held-out pairs:")
    print(f"{'kind':>14} {'pairs':>6} {'preference acc':>15} {'reward acc':>11} {'behaviour':>10} {'answered':>9}")
    for kind, f in sorted(per_kind.items(), key=lambda kv: kv[0] == "all"):
        n = f["pairs"]
        row = {"pairs": int(n), "preference_accuracy": f["preference"] / n, "reward_accuracy": f["reward"] / n,
               "behaviour": f["behaviour"] / n,
               "answered": f["answered"] / f["answerable"] if f["answerable"] else None}
        figures["kinds"][kind] = row
        answered = f"{100 * row['answered']:8.1f}%" if row["answered"] is not None else f"{'-':>9}"
        print(f"{kind:>14} {n:6.0f} {100 * row['preference_accuracy']:14.1f}% {100 * row['reward_accuracy']:10.1f}% "
              f"{100 * row['behaviour']:9.1f}% {answered}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
