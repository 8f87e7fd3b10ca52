"""phikit data ingest: normalisation, ids, exact dedup, source tags, bad input, resuming."""

import json
from pathlib import Path

import pytest

from phikit.data import ingest as ingest_mod
from phikit.data.docs import DataError, iter_documents
from phikit.data.ingest import doc_id, ingest, normalize

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
FOLDERS = [CORPUS / "web", CORPUS / "textbook", CORPUS / "notes"]


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_normalize():
    assert normalize("  Cafe\u0301\r\nline two   \r\n\n\n\n\u200bend\u00a0here\t \n") == "Café\nline two\n\nend here"
    assert normalize("def f():\n    return  1\n") == "def f():\n    return  1"  # indentation and inner spaces kept
    assert doc_id("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d"  # sha1("abc"), FIPS 180 test vector


def test_ingest_tiny_corpus(tmp_path):
    stage = ingest(FOLDERS, tmp_path / "docs.jsonl")
    docs = read(tmp_path / "docs.jsonl")
    # 309 raw documents: 241 web pages + 48 textbook sections + 20 notes; 17 are exact copies up to whitespace
    # (the 10 planted "exact-dup" pages and 7 template collisions among short/spam/repetitive pages)
    assert stage.counts["in"] == 309 and stage.counts["exact-duplicate"] == 17 and len(docs) == 292
    assert not any(d.get("kind") == "exact-dup" for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(d["id"] == doc_id(d["text"]) and d["text"] == normalize(d["text"]) for d in docs)
    assert {d["source"] for d in docs} == {"web", "textbook", "notes"}
    assert all(d["url"].startswith("https://") for d in docs if d["source"] == "web")  # jsonl fields are kept
    assert stage.summary().startswith("ingest: 309 documents in, 292 out; removed: exact-duplicate 17")
    removed = read(tmp_path / "docs.jsonl.removed.jsonl")
    assert len(removed) == 17 and all(r["reason"] == "exact-duplicate" for r in removed)


def test_source_flag_and_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"content": ["first  document ", "second document", "first  document"]}),
                   tmp_path / "in" / "part.parquet")
    stage = ingest([tmp_path / "in"], tmp_path / "docs.jsonl", source="books", text_field="content")
    docs = read(tmp_path / "docs.jsonl")
    assert [d["text"] for d in docs] == ["first  document", "second document"]
    assert {d["source"] for d in docs} == {"books"} and stage.counts["exact-duplicate"] == 1


def test_second_run_is_a_noop(tmp_path):
    out = tmp_path / "docs.jsonl"
    ingest(FOLDERS, out)
    before = out.read_bytes(), out.stat().st_mtime_ns
    stage = ingest(FOLDERS, out)
    assert stage.reused and "already complete" in stage.summary()
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    with pytest.raises(DataError, match="--overwrite"):  # other settings must not silently replace the output
        ingest(FOLDERS, out, source="other")


def test_interrupted_run_continues(tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    ingest(FOLDERS, full)
    out = tmp_path / "docs.jsonl"
    calls = {"n": 0}
    real = ingest_mod.normalize

    def flaky(text):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt
        return real(text)

    monkeypatch.setattr(ingest_mod, "normalize", flaky)
    with pytest.raises(KeyboardInterrupt):
        ingest(FOLDERS, out, every=40)
    assert not out.exists() and (tmp_path / "docs.jsonl.partial").exists()
    assert json.loads((tmp_path / "docs.jsonl.partial.state.json").read_text())["consumed"] == 149
    monkeypatch.setattr(ingest_mod, "normalize", real)
    calls["n"] = 0
    stage = ingest(FOLDERS, out, every=40)
    assert stage.resumed and out.read_bytes() == full.read_bytes()
    assert stage.counts["in"] == 309 and stage.counts["out"] == 292
    assert not (tmp_path / "docs.jsonl.partial").exists()


def test_not_utf8_is_a_clear_error_and_keeps_earlier_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("A good document about fractions.", encoding="utf-8")
    (src / "b.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (src / "c.md").write_text("# Another\n\nfine document", encoding="utf-8")
    out = tmp_path / "docs.jsonl"
    out.write_text('{"id": "x", "text": "earlier output", "source": "s"}\n')
    with pytest.raises(DataError, match=r"b\.txt is not valid UTF-8.*--skip-bad"):
        ingest([src], out, overwrite=True)
    assert out.read_text() == '{"id": "x", "text": "earlier output", "source": "s"}\n'
    stage = ingest([src], out, skip_bad=True, overwrite=True)
    assert [d["text"] for d in read(out)] == ["A good document about fractions.", "# Another\n\nfine document"]
    assert stage.counts["bad-input"] == 1 and "bad-input 1" in stage.summary()


def test_bad_jsonl_line(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\nnot json\n{"nope": 1}\n')
    with pytest.raises(DataError, match=r"in\.jsonl:2 is not valid UTF-8"):
        ingest([tmp_path / "in.jsonl"], tmp_path / "out.jsonl")
    stage = ingest([tmp_path / "in.jsonl"], tmp_path / "out.jsonl", skip_bad=True)
    assert stage.counts["bad-input"] == 3 and stage.counts["out"] == 1


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no documents found"):
        ingest([tmp_path / "empty"], tmp_path / "out.jsonl")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="no documents to write"):
        ingest([tmp_path / "blank"], tmp_path / "out.jsonl")
    assert list(tmp_path.glob("out.jsonl*")) == []
    with pytest.raises(DataError, match="does not exist"):
        ingest([tmp_path / "missing"], tmp_path / "out.jsonl")


def test_iter_documents_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 has no string 'text' field"):
        list(iter_documents([tmp_path / "d.jsonl"]))
