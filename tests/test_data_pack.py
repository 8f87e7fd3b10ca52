"""phikit data pack: shards read back equal the tokenized documents; val split; resume; bad input;
and the whole pipeline through the command line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phikit.commands.data import main as data_main
from phikit.data import pack as pack_mod
from phikit.data.docs import DataError
from phikit.data.ingest import ingest
from phikit.data.pack import is_val, pack
from phikit.data.shards import HEADER, ShardError, load_tokens, read_manifest
from phikit.data.tokenizer_train import build_tokenizer
from phikit.tokenizer import Tokenizer

CORPUS = Path(__file__).parent / "fixtures" / "corpus"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    ingest([CORPUS / "web", CORPUS / "textbook", CORPUS / "notes"], d / "docs.jsonl")
    build_tokenizer([d / "docs.jsonl"], d / "tok", vocab_size=800)
    return d


def expected_stream(d, val_fraction=0.0):
    tok = Tokenizer(d / "tok")
    train, val = [], []
    for line in open(d / "docs.jsonl", encoding="utf-8"):
        doc = json.loads(line)
        split = val if val_fraction and is_val(doc["id"], val_fraction) else train
        split.extend(tok.encode(doc["text"]) + [tok.eos_id])
    return train, val


def test_pack_reads_back_the_tokenized_documents(setup, tmp_path):
    out, summary = pack([setup / "docs.jsonl"], setup / "tok", tmp_path / "packed", shard_tokens=5000)
    manifest = read_manifest(out)
    train, _ = expected_stream(setup)
    shards = load_tokens(out)
    assert np.array_equal(np.concatenate(shards), np.array(train, dtype=np.uint32))
    assert all(len(s) == 5000 for s in shards[:-1]) and 0 < len(shards[-1]) <= 5000  # fixed-size shards
    assert shards[0].dtype == np.uint32
    assert manifest["eos_id"] == 800 and manifest["vocab_size"] == 811
    assert manifest["documents"] == 292 and manifest["tokens"] == len(train) and manifest["source"] == "docs"
    assert [s["tokens"] for s in manifest["shards"]] == [len(s) for s in shards]
    assert summary.startswith(f"pack: 292 documents in; train 292 documents, {len(train)} tokens in "
                              f"{len(shards)} shards")
    again = pack([setup / "docs.jsonl"], setup / "tok", tmp_path / "packed", shard_tokens=5000)[1]
    assert again.endswith("(already complete, nothing to do)")


def test_validation_split(setup, tmp_path):
    out, summary = pack([setup / "docs.jsonl"], setup / "tok", tmp_path / "packed", shard_tokens=4096,
                        val_fraction=0.1, source="web-and-books")
    train, val = expected_stream(setup, 0.1)
    assert np.array_equal(np.concatenate(load_tokens(out)), train)
    assert np.array_equal(np.concatenate(load_tokens(out / "val")), val)
    m, mv = read_manifest(out), read_manifest(out / "val")
    assert m["val"] == "val" and m["split"] == "train" and mv["split"] == "val" and m["source"] == "web-and-books"
    assert m["documents"] + mv["documents"] == 292 and 10 <= mv["documents"] <= 50  # about 10% of 292
    assert "; val " in summary


def test_interrupted_pack_continues(setup, tmp_path, monkeypatch):
    ref, _ = pack([setup / "docs.jsonl"], setup / "tok", tmp_path / "ref", shard_tokens=2000, val_fraction=0.2,
                  batch_size=16)
    calls = {"n": 0}
    real = pack_mod.is_val

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pack_mod, "is_val", flaky)
    with pytest.raises(KeyboardInterrupt):
        pack([setup / "docs.jsonl"], setup / "tok", tmp_path / "out", shard_tokens=2000, val_fraction=0.2,
             batch_size=16)
    state = json.loads((tmp_path / "out.partial" / "pack.state.json").read_text())
    assert 0 < state["consumed"] < 150 and not (tmp_path / "out").exists()
    monkeypatch.setattr(pack_mod, "is_val", real)
    out, _ = pack([setup / "docs.jsonl"], setup / "tok", tmp_path / "out", shard_tokens=2000, val_fraction=0.2,
                  batch_size=16)
    for sub in ("", "val"):
        assert [s.tolist() for s in load_tokens(out / sub)] == [s.tolist() for s in load_tokens(ref / sub)]
        assert read_manifest(out / sub)["documents"] == read_manifest(ref / sub)["documents"]
    assert not (tmp_path / "out.partial").exists()


def test_bad_inputs_keep_earlier_output(setup, tmp_path):
    out, _ = pack([setup / "docs.jsonl"], setup / "tok", tmp_path / "packed", shard_tokens=5000)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        pack([tmp_path / "empty.jsonl"], setup / "tok", out, overwrite=True)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid UTF-8"):
        pack([tmp_path / "bad.jsonl"], setup / "tok", out, overwrite=True)
    with pytest.raises(DataError, match="--overwrite"):
        pack([setup / "docs.jsonl"], setup / "tok", out, shard_tokens=999)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a shard with a wrong header is refused by name when read back
    shard = out / "shard-00000.bin"
    shard.write_bytes(b"NOTPHIKT" + shard.read_bytes()[8:])
    with pytest.raises(ShardError, match=r"shard-00000\.bin is not a phikit token shard"):
        load_tokens(out)
    shard.write_bytes(HEADER.pack(b"PHIKTOK\0", 2, 4, 10) + bytes(40))
    with pytest.raises(ShardError, match="unsupported shard version 2"):
        load_tokens(out)
    with pytest.raises(DataError, match="tokenizer.json"):
        pack([setup / "docs.jsonl"], tmp_path, tmp_path / "p2")


def test_pipeline_on_the_command_line(tmp_path, capsys):
    """ingest -> dedup -> score -> filter -> tokenizer -> pack, each summary line on stdout."""
    w = str(tmp_path)
    steps = [
        ["ingest", str(CORPUS / "web"), str(CORPUS / "textbook"), str(CORPUS / "notes"), "-o", f"{w}/docs.jsonl"],
        ["dedup", f"{w}/docs.jsonl", "-o", f"{w}/dedup.jsonl"],
        ["score", f"{w}/dedup.jsonl", "-o", f"{w}/scored.jsonl", "--classifier", f"{w}/quality.safetensors",
         "--labels", str(CORPUS / "labels.jsonl"), "--n-features", "65536"],
        ["filter", f"{w}/scored.jsonl", "-o", f"{w}/clean.jsonl", "--min-quality", "0.5"],
        ["tokenizer", f"{w}/clean.jsonl", "-o", f"{w}/tok", "--vocab-size", "1000"],
        ["pack", f"{w}/clean.jsonl", "--tokenizer", f"{w}/tok", "-o", f"{w}/packed", "--shard-tokens", "8192",
         "--val-fraction", "0.1"],
    ]
    lines = []
    for argv in steps:
        assert data_main(argv) == 0
        lines.append(capsys.readouterr().out.strip())
    assert lines[0].startswith("ingest: 309 documents in, 292 out; removed: exact-duplicate 17")
    assert lines[1].startswith("dedup: 292 documents in, 262 out; removed: near-duplicate 30; clusters 30")
    assert lines[2].startswith("score: 262 documents in, 262 out")
    assert lines[3].startswith("filter: 262 documents in, 137 out; removed: ") and "low-quality 55" in lines[3]
    assert lines[4].startswith("tokenizer: trained, vocabulary 1011 tokens")
    assert lines[5].startswith("pack: 137 documents in; train ")
    kept = [json.loads(line) for line in open(f"{w}/clean.jsonl")]
    assert {d.get("kind", d["source"]) for d in kept} <= {"edu", "textbook", "notes", "near-dup"}
    assert read_manifest(f"{w}/packed")["documents"] + read_manifest(f"{w}/packed/val")["documents"] == 137
    # every stage again: all no-ops
    for argv in steps:
        data_main(argv)
        assert "already complete" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="phikit: no documents found"):  # an empty corpus: one clear line
        data_main(["ingest", f"{w}/empty", "-o", f"{w}/x.jsonl"])


def test_help_shows_every_stage_and_defaults():
    out = subprocess.run([sys.executable, "-m", "phikit", "data", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ("ingest", "dedup", "score", "filter", "tokenizer", "pack"):
        assert stage in out.stdout
    from phikit.commands.data import parser

    subparsers = next(a for a in parser()._actions if a.dest == "stage").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in action.help or "required" in action.help, (name, action.dest)
