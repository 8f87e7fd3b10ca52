"""Heuristic filters: each scorer on hand-made texts, thresholds, and the filter stage on the tiny corpus."""

import json
from pathlib import Path

import pytest

from phikit.data import filter as F
from phikit.data.docs import DataError
from phikit.data.ingest import ingest

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
PROSE = ("Photosynthesis is the process by which green plants use light energy to turn carbon dioxide and water "
         "into glucose and oxygen. Most of it happens in the leaves, inside small structures called chloroplasts. "
         "The oxygen we breathe is released as a by-product when water molecules are split. This matters because "
         "almost every food chain on Earth starts with the sugar that plants make.")


def test_scorers():
    assert F.n_words("one two  three\nfour") == 4
    assert F.mean_word_length("ab abcd") == 3
    assert F.symbol_ratio("# a ... b … c") == 3 / 6
    assert F.alpha_word_fraction("abc 123 x1") == 2 / 3
    assert F.non_alnum_char_fraction("a$b$") == 0.5
    assert F.duplicate_line_fraction("a\nb\na\na\n\n") == 0.5
    assert F.top_ngram_fraction("a b a b a b") == pytest.approx(6 / 6)  # "a b" covers every character 3 times
    assert F.top_ngram_fraction(PROSE) < 0.1
    assert F.duplicate_ngram_fraction("x y z w v " * 3) == 1.0 and F.duplicate_ngram_fraction(PROSE) == 0.0
    assert F.stopword_fraction("the cat and the dog") == 0.6
    assert F.stopword_fraction("Die Katze und der Hund schlafen") == 0.0
    assert F.boilerplate_line_fraction("Home\nPrivacy Policy | Terms of Use\nWe use cookies") == 2 / 3


def test_rules_and_thresholds():
    rules = F.default_rules()
    assert F.first_failure(PROSE, rules) is None
    assert F.first_failure("Too short.", rules) == "too-short"
    assert F.first_failure((PROSE + "\n") * 3, rules) == "repeated-lines"
    assert F.first_failure(PROSE + " ### $$$ ..." * 8, rules) == "symbols"
    german = "Die Photosynthese ist ein Prozess, bei dem Pflanzen Lichtenergie nutzen. " * 8
    assert F.first_failure(german, F.default_rules(max_duplicate_lines=1, max_top_2gram=1,
                                                       max_duplicate_5grams=1)) == "language"
    # thresholds move the decision; None turns a rule off
    assert F.first_failure("It is short.", F.default_rules(min_words=1)) is None
    assert "too-short" not in [r.name for r in F.default_rules(min_words=None)]
    rule = F.Rule("length", F.n_words, min=2, max=3)
    assert [rule(t) for t in ("a", "a b", "a b c", "a b c d")] == [False, True, True, False]


def test_filter_stage_on_tiny_corpus(tmp_path):
    ingest([CORPUS / "web"], tmp_path / "docs.jsonl")
    stage = F.filter_documents([tmp_path / "docs.jsonl"], tmp_path / "clean.jsonl", F.default_rules())
    kept = [json.loads(line) for line in open(tmp_path / "clean.jsonl")]
    kinds = {d["kind"] for d in kept}
    # every spam, boilerplate, repetitive, foreign and short page goes; fluent pages (edu, chatty) stay:
    # telling those apart is the classifier's job (test_data_quality.py)
    assert kinds <= {"edu", "chatty", "near-dup"}
    assert sum(d["kind"] == "edu" for d in kept) == 80
    removed = [json.loads(line) for line in open(tmp_path / "clean.jsonl.removed.jsonl")]
    assert {r["reason"] for r in removed} >= {"symbols", "boilerplate", "repeated-lines", "too-short"}
    assert stage.counts["in"] == stage.counts["out"] + len(removed)
    assert "removed:" in stage.summary() and "symbols" in stage.summary()


def test_min_quality(tmp_path):
    docs = [{"id": str(i), "text": PROSE, "source": "s", "quality": q} for i, q in enumerate([0.1, 0.5, 0.9])]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    stage = F.filter_documents([tmp_path / "scored.jsonl"], tmp_path / "out.jsonl", [], min_quality=0.5)
    assert [json.loads(line)["id"] for line in open(tmp_path / "out.jsonl")] == ["1", "2"]
    assert stage.counts["low-quality"] == 1
    (tmp_path / "plain.jsonl").write_text(json.dumps({"id": "a", "text": PROSE}) + "\n")
    with pytest.raises(DataError, match="phikit data score"):
        F.filter_documents([tmp_path / "plain.jsonl"], tmp_path / "out2.jsonl", [], min_quality=0.5)
