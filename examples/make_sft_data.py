"""Write the chat data that examples/sft-tiny.yaml fine-tunes on: short Q/A conversations, in TRL's formats.

    python examples/make_sft_data.py                 # -> examples/tiny-data/chat/{train,val,heldout}.jsonl
    python examples/make_sft_data.py --out DIR --train 2000

The questions come from the world of the pretraining corpus (examples/make_tiny_shards.py): capitals,
sums, what a small Python function returns. Most rows are `{"messages": [...]}` conversations (some with a
system message, some two turns long), a quarter are `{"prompt", "completion"}` rows, the other format
TRL reads. The split is by question: a sum or a country question asked in `heldout.jsonl` is never asked
in `train.jsonl` or `val.jsonl`, so the held-out prompts test answers the model has not seen.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COUNTRIES = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("India", "Delhi")]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a careful teacher."]
CAPITAL_QS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}."]
SUM_QS = ["What is {x} plus {y}?", "Add {x} and {y}.", "How much is {x} + {y}?"]


def qa(rng: random.Random, heldout: bool) -> tuple[str, str, str]:
    """(kind, question, answer); a question is held out by a fixed rule on its numbers or country."""
    while True:
        if rng.random() < 0.5:
            x, y = rng.randint(2, 20), rng.randint(2, 20)
            if ((x * 7 + y) % 10 == 0) != heldout:  # about 1 sum in 10 is held out
                continue
            return "sum", rng.choice(SUM_QS).format(x=x, y=y), f"{x} + {y} = {x + y}. The answer is {x + y}."
        i = rng.randrange(len(COUNTRIES))
        q = rng.randrange(len(CAPITAL_QS))
        if ((i + q) % 5 == 0) != heldout:  # some phrasings of some countries are held out
            continue
        country, capital = COUNTRIES[i]
        return "capital", CAPITAL_QS[q].format(c=country), f"The capital of {country} is {capital}."


def row(rng: random.Random, heldout: bool) -> dict:
    _, q1, a1 = qa(rng, heldout)
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
    if heldout:  # prompt-completion rows: the prompt to answer, the reference answer for the held-out loss
        return {"prompt": messages[:-1], "completion": a1}
    if rng.random() < 0.25:
        _, q2, a2 = qa(rng, heldout)
        messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    if rng.random() < 0.25:  # TRL's prompt-completion form: the prompt as messages, the completion as text
        return {"prompt": messages[:-1], "completion": messages[-1]["content"]}
    return {"messages": messages}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-data" / "chat",
                   help="output directory (default: examples/tiny-data/chat)")
    p.add_argument("--train", type=int, default=1600, help="training conversations (default: 1600)")
    p.add_argument("--val", type=int, default=128, help="validation conversations (default: 128)")
    p.add_argument("--heldout", type=int, default=200, help="held-out prompts with reference answers (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n, heldout in (("train", args.train, False), ("val", args.val, False), ("heldout", args.heldout, True)):
        rng = random.Random(f"{args.seed}-{split}")
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row(rng, heldout)) + "\n" for _ in range(n)))
        print(f"{path}: {n} rows")


if __name__ == "__main__":
    main()
