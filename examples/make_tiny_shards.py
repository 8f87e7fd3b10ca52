"""Write the tiny corpus that examples/pretrain-tiny.yaml trains on: four synthetic sources and a tokenizer.

    python examples/make_tiny_shards.py                 # -> examples/tiny-data/{web,code,filtered_web,synthetic,tokenizer}
    python examples/make_tiny_shards.py --out DIR --tokens 50000

Each source is generated from a small template grammar with a fixed seed, so the files are the same on
every machine: `web` is loose English prose, `filtered_web` the cleaner factual part of it, `code` short
Python functions, `synthetic` textbook-style questions with worked answers. A 512-entry byte-level BPE
tokenizer (HF tokenizers) is trained on a sample of all four, saved as a checkpoint-style tokenizer
directory, and used to pack each source into phikit token shards (phikit/data/shards.py) with a manifest:
the same layout `phikit data pack` writes, so the recipe cannot tell them apart. Like `phikit data
tokenizer`, it reserves Phi-3's chat tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`) and
carries the Phi-3.5 chat template, which pretraining never sees and fine-tuning
(examples/sft-tiny.yaml) teaches.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from phikit.chat_format import family_template
from phikit.data.shards import write_manifest, write_shard
from phikit.tokenizer import Tokenizer

EOS = "<|endoftext|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]  # Phi-3's chat markers, reserved
NOUNS = ["river", "city", "garden", "machine", "teacher", "market", "forest", "engine", "child", "library",
         "mountain", "letter", "window", "farmer", "bridge", "storm", "island", "clock", "painter", "song"]
ADJS = ["old", "quiet", "bright", "small", "busy", "cold", "green", "heavy", "strange", "gentle", "early", "long"]
VERBS = ["watches", "follows", "builds", "carries", "finds", "remembers", "crosses", "opens", "paints", "hears"]
PLACES = ["the valley", "the harbour", "a small town", "the north", "the old road", "the coast", "the square"]
COUNTRIES = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("India", "Delhi")]
FUNCS = ["add", "scale", "total", "clamp", "mean", "count", "square", "double", "offset", "blend"]
VARS = ["x", "y", "n", "a", "b", "value", "items", "size", "step", "limit"]


def web(rng: random.Random) -> str:
    def sentence():
        return (f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} "
                f"near {rng.choice(PLACES)}.")
    def fact():
        country, capital = rng.choice(COUNTRIES)
        return f"The capital of {country} is {capital}."
    noise = rng.choice(["", " Click here!!", " | Home | About |", " lol", " ..."])
    return " ".join(rng.choice([sentence, sentence, fact])() for _ in range(rng.randint(3, 8))) + noise


def filtered_web(rng: random.Random) -> str:
    country, capital = rng.choice(COUNTRIES)
    n = rng.randint(2, 9)
    return (f"{country} is a country. The capital of {country} is {capital}. {capital} has {n} "
            f"{rng.choice(NOUNS)}s and an {rng.choice(['old', 'early'])} {rng.choice(NOUNS)}. "
            f"Many people visit {capital} to see the {rng.choice(ADJS)} {rng.choice(NOUNS)}.")


def code(rng: random.Random) -> str:
    f, a, b = rng.choice(FUNCS), *rng.sample(VARS, 2)
    op = rng.choice(["+", "-", "*"])
    return (f"def {f}_{a}({a}, {b}):\n    result = {a} {op} {b}\n    if result > {rng.randint(1, 99)}:\n"
            f"        return {b}\n    return result\n\n\nprint({f}_{a}({rng.randint(0, 9)}, {rng.randint(0, 9)}))\n")


def synthetic(rng: random.Random) -> str:
    x, y = rng.randint(2, 20), rng.randint(2, 20)
    country, capital = rng.choice(COUNTRIES)
    return (f"Question: What is {x} plus {y}?\nAnswer: We add {x} and {y}. {x} + {y} = {x + y}. The answer is "
            f"{x + y}.\n\nQuestion: What is the capital of {country}?\nAnswer: The capital of {country} is {capital}.")


SOURCES = {"web": web, "code": code, "filtered_web": filtered_web, "synthetic": synthetic}


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, *CHAT_TOKENS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer.from_parts(backend, {"eos_token": EOS, "chat_template": family_template("phi-3.5")})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-data",
                   help="output directory (default: examples/tiny-data)")
    p.add_argument("--tokens", type=int, default=300_000, help="tokens per source, about (default: 300000)")
    p.add_argument("--shards", type=int, default=2, help="shards per source (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    args = p.parse_args(argv)

    sample = [SOURCES[name](random.Random(f"tok-{name}-{i}")) for name in SOURCES for i in range(300)]
    tokenizer = train_tokenizer(sample, vocab_size=512)
    (args.out / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out / "tokenizer")
    eos = tokenizer.eos_id
    for name, make in SOURCES.items():
        rng = random.Random(f"{args.seed}-{name}")
        docs, n = [], 0
        while n < args.tokens:
            batch = [make(rng) for _ in range(256)]
            for enc in tokenizer.backend.encode_batch(batch):
                docs.append(enc.ids + [eos])  # each document ends with the end-of-text id
                n += len(enc.ids) + 1
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        shards = []
        for i, part in enumerate(np.array_split(np.arange(len(docs)), args.shards)):
            tokens = np.concatenate([np.array(docs[j], dtype=np.uint32) for j in part])
            write_shard(out / f"shard-{i:05d}.bin", tokens)
            shards.append({"file": f"shard-{i:05d}.bin", "tokens": int(tokens.size)})
        write_manifest(out, {"vocab_size": tokenizer.vocab_size, "eos_id": eos, "documents": len(docs),
                             "tokens": sum(s["tokens"] for s in shards), "shards": shards})
        print(f"{out}: {len(docs)} documents, {sum(s['tokens'] for s in shards)} tokens")


if __name__ == "__main__":
    main()
