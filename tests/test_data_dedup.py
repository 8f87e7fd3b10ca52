"""phikit data dedup: MinHash LSH removes the planted near-duplicates and little else."""

import json
from pathlib import Path

import pytest

from phikit.data.dedup import dedup, minhash, shingles
from phikit.data.docs import DataError
from phikit.data.ingest import ingest

CORPUS = Path(__file__).parent / "fixtures" / "corpus"


@pytest.fixture(scope="module")
def docs_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup") / "docs.jsonl"
    ingest([CORPUS / "web", CORPUS / "textbook", CORPUS / "notes"], out)
    return out


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_shingles_and_minhash():
    assert shingles("One two three four five six", ngram=5) == {b"one two three four five", b"two three four five six"}
    assert shingles("Too short", ngram=5) == {b"too short"}
    a = "the quick brown fox jumps over the lazy dog " * 3 + "and then it runs far away into the woods"
    b = a.replace("lazy", "sleepy", 1)
    sa, sb = shingles(a), shingles(b)
    exact = len(sa & sb) / len(sa | sb)
    assert abs(minhash(a).jaccard(minhash(b)) - exact) < 0.1  # 128 permutations: standard error ~0.04


def test_planted_near_duplicates_are_removed(docs_path, tmp_path):
    stage = dedup([docs_path], tmp_path / "dedup.jsonl", threshold=0.8)
    docs = {d["id"]: d for d in read(docs_path)}
    kept = read(tmp_path / "dedup.jsonl")
    removed = read(tmp_path / "dedup.jsonl.removed.jsonl")
    planted = [d for d in docs.values() if d.get("kind") == "near-dup"]
    removed_planted = [r for r in removed if docs[r["id"]].get("kind") == "near-dup"]
    # 24 planted (one word changed + a share line); measured: 23 found at threshold 0.8 (the missed one has
    # true Jaccard 0.85, estimated below 0.8)
    assert len(planted) == 24 and len(removed_planted) >= 22
    # each planted copy is removed as a duplicate of its own original
    web = [json.loads(line) for line in open(CORPUS / "web" / "pages-00.jsonl", encoding="utf-8")]
    for r in removed_planted:
        original = web[docs[r["id"]]["of"]]["text"]
        assert docs[r["duplicate_of"]]["text"].split()[:20] == original.split()[:20]
        assert r["jaccard"] >= 0.8
    # what else goes: only look-alike template pages (spam, repetitive, foreign) and at most a few sections
    others = [docs[r["id"]].get("kind", docs[r["id"]]["source"]) for r in removed if r not in removed_planted]
    assert sum(k in ("edu", "chatty", "notes", "textbook") for k in others) <= 3
    assert stage.counts["in"] == len(docs) and stage.counts["out"] == len(kept)
    assert 20 <= stage.extra["clusters"] <= len(removed)
    assert f"clusters {stage.extra['clusters']}" in stage.summary()


def test_threshold_is_configurable(docs_path, tmp_path):
    strict = dedup([docs_path], tmp_path / "strict.jsonl", threshold=0.95)
    loose = dedup([docs_path], tmp_path / "loose.jsonl", threshold=0.5)
    assert strict.counts["near-duplicate"] < loose.counts["near-duplicate"]
    with pytest.raises(DataError, match="threshold"):
        dedup([docs_path], tmp_path / "x.jsonl", threshold=1.5)
    with pytest.raises(DataError, match="raise --num-perm"):
        dedup([docs_path], tmp_path / "x.jsonl", threshold=0.99)


def test_resume(docs_path, tmp_path, monkeypatch):
    from phikit.data import dedup as dedup_mod

    full = dedup([docs_path], tmp_path / "full.jsonl")
    again = dedup([docs_path], tmp_path / "full.jsonl")
    assert again.reused and again.extra == full.extra
    calls = {"n": 0}
    real = dedup_mod.minhash

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 200:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(dedup_mod, "minhash", flaky)
    with pytest.raises(KeyboardInterrupt):
        dedup([docs_path], tmp_path / "part.jsonl", every=50)
    monkeypatch.setattr(dedup_mod, "minhash", real)
    resumed = dedup([docs_path], tmp_path / "part.jsonl", every=50)
    assert resumed.resumed
    assert (tmp_path / "part.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert resumed.counts == full.counts and resumed.extra == full.extra


def test_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no documents"):
        dedup([tmp_path / "empty.jsonl"], tmp_path / "out.jsonl")
