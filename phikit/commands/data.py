"""`phikit data {ingest,dedup,score,filter,tokenizer,pack}`: the pretraining data pipeline, one stage per command.

    phikit data ingest corpus/web corpus/textbook -o work/docs.jsonl
    phikit data dedup work/docs.jsonl -o work/dedup.jsonl
    phikit data score work/dedup.jsonl -o work/scored.jsonl --classifier work/quality.safetensors --labels labels.jsonl
    phikit data filter work/scored.jsonl -o work/clean.jsonl --min-quality 0.5
    phikit data tokenizer work/clean.jsonl -o work/tokenizer --vocab-size 8000
    phikit data pack work/clean.jsonl --tokenizer work/tokenizer -o work/packed --val-fraction 0.05

Each stage reads files and writes one output atomically, continues an interrupted run when started
again with the same settings (and does nothing when its output is already complete), shows a
progress bar on stderr and prints a one-line summary of counts on stdout.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

from ..data.filter import default_rules


# one line per threshold argument of filter.default_rules
RULE_HELP = {
    "min_words": "drop documents with fewer words",
    "max_words": "drop documents with more words",
    "max_symbol_ratio": "most '#' and ellipses per word",
    "min_alpha_words": "least fraction of words that contain a letter",
    "max_non_alnum": "most fraction of non-space characters that are neither letters nor digits",
    "max_duplicate_lines": "most fraction of lines that repeat an earlier line",
    "max_top_2gram": "most fraction of word characters inside the most frequent word 2-gram",
    "max_duplicate_5grams": "most fraction of word characters inside repeated word 5-grams",
    "min_stopwords": "least fraction of English stop words; 0 turns the language rule off",
    "max_boilerplate_lines": "most fraction of lines with boilerplate phrases (cookies, javascript, ...)",
}


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("-o", "--out", required=True, help=f"{out_help} (required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output made with other settings; the old one stays until the new one is "
                        "complete (default: off)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phikit data", description="The pretraining data pipeline: ingest -> dedup -> "
                                "score -> filter -> tokenizer -> pack. Run 'phikit data <stage> --help' for a stage's flags, each with its default.")
    sub = p.add_subparsers(dest="stage", required=True, metavar="{ingest,dedup,score,filter,tokenizer,pack}")

    s = sub.add_parser("ingest", help="text / markdown / jsonl / parquet folders -> normalised jsonl documents, "
                                      "exact duplicates removed",
                       description="Read .txt/.md files (one document each), .jsonl and .parquet files (one "
                                   "document per record); NFC-normalise, clean whitespace, id = sha1 of the text, "
                                   "drop exact duplicates.")
    s.add_argument("inputs", nargs="+", help="input folders or files")
    _common(s, "output jsonl file")
    s.add_argument("--source", default=None,
                   help="source tag for every document "
                        "(default: the record's own 'source', else the input folder name)")
    s.add_argument("--text-field", default="text", help="text field of jsonl / parquet records (default: text)")
    s.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this (default: 1)")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) files or lines that are not UTF-8 or not JSON instead of stopping "
                        "(default: off)")

    s = sub.add_parser("dedup", help="near-duplicate removal with MinHash LSH",
                       description="Drop documents whose word n-gram sets have estimated Jaccard similarity >= "
                                   "--threshold with an earlier kept document (MinHash LSH, datasketch).")
    s.add_argument("inputs", nargs="+", help="input jsonl / parquet files")
    _common(s, "output jsonl file")
    s.add_argument("--threshold", type=float, default=0.8,
                   help="Jaccard similarity that counts as duplicate (default: 0.8)")
    s.add_argument("--ngram", type=int, default=5, help="words per shingle (default: 5)")
    s.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default: 128)")
    s.add_argument("--seed", type=int, default=1, help="MinHash seed (default: 1)")

    s = sub.add_parser("score", help="educational-value classifier: train it (once) and add a 'quality' field",
                       description="Add a 'quality' score to every document with a hashed n-gram logistic "
                                   "regression classifier. If --classifier does not exist (or with --retrain) it "
                                   "is first trained on --labels, or on a sample labelled by --label-with.")
    s.add_argument("inputs", nargs="+", help="input jsonl / parquet files")
    _common(s, "output jsonl file")
    s.add_argument("--classifier", required=True, help="classifier file (.safetensors) to use or to create (required)")
    s.add_argument("--labels", default=None, help='jsonl of {"text", "label"} examples to train on (default: none)')
    s.add_argument("--label-with", choices=("heuristic", "llm"), default=None,
                   help="label a sample of the inputs with the heuristic rules or an LLM instead (default: none)")
    s.add_argument("--label-sample", type=int, default=2000,
                   help="documents to label with --label-with (default: 2000)")
    s.add_argument("--llm-url", default="http://127.0.0.1:8000/v1",
                   help="OpenAI-compatible base URL for --label-with llm (default: http://127.0.0.1:8000/v1)")
    s.add_argument("--llm-model", default="phi", help="model name sent to the endpoint (default: phi)")
    s.add_argument("--llm-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key, if any (default: OPENAI_API_KEY)")
    s.add_argument("--retrain", action="store_true", help="train even if --classifier exists (default: off)")
    s.add_argument("--n-features", type=int, default=2**18, help="hashed feature buckets (default: 262144)")
    s.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of labels held out to report accuracy (default: 0.1)")
    s.add_argument("--batch-size", type=int, default=256, help="documents scored at once (default: 256)")

    s = sub.add_parser("filter", help="keep documents passing the heuristic rules and a quality threshold",
                       description="Drop documents that break a heuristic rule (Gopher-style length, symbol, "
                                   "repetition, language and boilerplate tests) or score below --min-quality. "
                                   "Set a threshold to 0 (minimums) or a large number (maximums) to turn a rule off.")
    s.add_argument("inputs", nargs="+", help="input jsonl / parquet files")
    _common(s, "output jsonl file")
    s.add_argument("--min-quality", type=float, default=None,
                   help="keep documents whose 'quality' (from score) is at least this (default: none, not used)")
    s.add_argument("--no-heuristics", action="store_true",
                   help="apply no heuristic rule, only --min-quality (default: off)")
    for name, param in inspect.signature(default_rules).parameters.items():
        s.add_argument("--" + name.replace("_", "-"), type=type(param.default), default=param.default,
                       help=f"{RULE_HELP[name]} (default: {param.default})")

    s = sub.add_parser("tokenizer", help="train a Phi-3-style BPE tokenizer with byte fallback, or copy one",
                       description="Train a BPE tokenizer (byte fallback, Phi special tokens reserved, Phi-3.5 chat "
                                   "template) on the documents, or copy an existing tokenizer with --existing.")
    s.add_argument("inputs", nargs="*", help="input jsonl / parquet files (none with --existing)")
    _common(s, "output tokenizer directory")
    s.add_argument("--vocab-size", type=int, default=32000,
                   help="base vocabulary: 3 specials + 256 bytes + learned pieces; the 11 Phi tokens come on top "
                        "(default: 32000)")
    s.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (default: 2)")
    s.add_argument("--limit-alphabet", type=int, default=1000,
                   help="most distinct characters kept; rarer ones use byte fallback (default: 1000)")
    s.add_argument("--existing", default=None,
                   help="a tokenizer directory or tokenizer.json to use instead of training (default: none)")

    s = sub.add_parser("pack", help="tokenize documents into fixed-size uint32 shards + manifest",
                       description="Tokenize documents, append the end-of-text id to each, and cut the stream into "
                                   "shards of --shard-tokens tokens (phikit.data.shards format). With "
                                   "--val-fraction, validation shards go to OUT/val with their own manifest.")
    s.add_argument("inputs", nargs="+", help="input jsonl / parquet files")
    _common(s, "output directory")
    s.add_argument("--tokenizer", required=True,
                   help="tokenizer directory, from `phikit data tokenizer` or a checkpoint (required)")
    s.add_argument("--shard-tokens", type=int, default=2**24, help="tokens per shard (default: 16777216, 64 MB)")
    s.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of documents for validation, written to OUT/val (default: 0.0)")
    s.add_argument("--source", default=None,
                   help="name of this data source in the manifest (default: the input file's stem)")
    s.add_argument("--eos-token", default=None, help="document separator token (default: the tokenizer's eos)")
    s.add_argument("--batch-size", type=int, default=256, help="documents tokenized at once (default: 256)")
    return p


def _score(a) -> str:
    from pathlib import Path

    from ..data import quality

    if a.retrain or not Path(a.classifier).exists():
        if a.labels:
            texts, labels = quality.read_labels(a.labels)
        elif a.label_with:
            sample = quality.sample_texts(a.inputs, a.label_sample)
            labeller = quality.heuristic_label if a.label_with == "heuristic" else quality.LLMLabeller(
                a.llm_url, a.llm_model, os.environ.get(a.llm_api_key_env))
            texts, labels = quality.label_texts(sample, labeller)
            labels_path = Path(a.classifier).with_suffix(".labels.jsonl")
            _write_labels(labels_path, texts, labels)
            print(f"[phikit] labelled {len(texts)} of {len(sample)} sampled documents -> {labels_path}",
                  file=sys.stderr)
        else:
            raise quality.DataError(f"{a.classifier} does not exist: pass --labels FILE or --label-with "
                                    "{heuristic,llm} to train it")
        clf, m = quality.train(texts, labels, n_features=a.n_features, holdout=a.holdout)
        clf.save(a.classifier)
        acc = f", held-out accuracy {m['held_out_accuracy']:.3f} on {m['held_out']}" if m["held_out"] else ""
        print(f"[phikit] trained the quality classifier on {m['train']} examples{acc} -> {a.classifier}",
              file=sys.stderr)
    return quality.score_documents(a.inputs, a.out, a.classifier, a.batch_size, a.overwrite).summary()


def _write_labels(path, texts, labels) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t, y in zip(texts, labels):
            f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(a) -> str:
    """Run the parsed stage; returns its summary line."""
    if a.stage == "ingest":
        from ..data.ingest import ingest
        return ingest(a.inputs, a.out, a.source, a.text_field, a.min_chars, a.skip_bad, a.overwrite).summary()
    if a.stage == "dedup":
        from ..data.dedup import dedup
        return dedup(a.inputs, a.out, a.threshold, a.ngram, a.num_perm, a.seed, a.overwrite).summary()
    if a.stage == "score":
        return _score(a)
    if a.stage == "filter":
        from ..data.filter import filter_documents
        names = inspect.signature(default_rules).parameters
        rules = [] if a.no_heuristics else default_rules(**{n: getattr(a, n) for n in names})
        return filter_documents(a.inputs, a.out, rules, a.min_quality, a.overwrite).summary()
    if a.stage == "tokenizer":
        from ..data.tokenizer_train import build_tokenizer
        return build_tokenizer(a.inputs, a.out, a.vocab_size, a.min_frequency, a.limit_alphabet, a.existing,
                               a.overwrite)[1]
    from ..data.pack import pack
    return pack(a.inputs, a.tokenizer, a.out, a.shard_tokens, a.val_fraction, a.source, a.eos_token,
                a.batch_size, a.overwrite)[1]


def main(argv: list[str] | None = None) -> int:
    from ..data.docs import DataError
    from ..data.shards import ShardError

    a = parser().parse_args(argv)
    if a.stage == "tokenizer" and not a.inputs and not a.existing:
        sys.exit("phikit: data tokenizer needs input files to train on, or --existing")
    try:
        print(run(a))
    except (DataError, ShardError, OSError) as e:
        sys.exit(f"phikit: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
