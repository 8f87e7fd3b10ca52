"""Ingest: folders of text / markdown / jsonl / parquet files -> normalised documents, exact duplicates removed.

Each .txt / .md / .markdown file is one document; each line of a .jsonl file and each row of a
.parquet file is one document (its `text` field; other fields are kept). Folders are walked in
sorted order, so the output order, and so resuming, is deterministic. Other file types are skipped
and counted.

Normalisation (`normalize`): Unicode NFC; \\r\\n and \\r -> \\n; no-break and other Unicode spaces ->
a plain space; zero-width and control characters (except \\n and \\t) removed; trailing whitespace
stripped on every line; runs of blank lines collapsed to one; leading and trailing whitespace of the document removed.
Indentation and inner runs of spaces are kept (code is text too). The id is the sha1 of the
normalised text, so exact duplicates share an id and all but the first are dropped.

The source tag is --source when given, else the document's own "source" field, else the name of
the input folder (or of the folder holding an input file).

A file that is not UTF-8 (or a jsonl line that is not a JSON object) stops the run with an error
naming the file and line; with skip_bad=True it is skipped and counted as "bad-input".
References: FineWeb / datatrove readers; CCNet's normalisation.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterator

from .docs import DataError, Stage, _iter_parquet, progress

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}

_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff\x00-\x08\x0b-\x1f\x7f]")  # zero-width, BOM, controls but \t \n
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC + whitespace cleanup, as described in the module docstring."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", _SPACES.sub(" ", text))
    return _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text)).strip()


def doc_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def list_files(inputs: list[str | Path]) -> list[tuple[Path, str]]:
    """(file, folder tag) for every file under the inputs, sorted; raises when an input is missing."""
    files = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            tag = inp.resolve().name
            files += [(p, tag) for p in sorted(inp.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        elif inp.is_file():
            files.append((inp, inp.resolve().parent.name))
        else:
            raise DataError(f"{inp} does not exist")
    return files


def _raw_records(files: list[tuple[Path, str]], text_field: str) -> Iterator[tuple[dict | None, str, str]]:
    """(record or None, tag, where) per raw document; None with an error message in `where` for bad input."""
    for path, tag in files:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            raw = path.read_bytes()
            try:
                yield {"text": raw.decode("utf-8")}, tag, str(path)
            except UnicodeDecodeError as e:
                yield None, tag, f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})"
        elif suffix == ".jsonl":
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        yield None, tag, f"{path}:{n} is not valid UTF-8 ({e.reason} at byte {e.start})"
                        continue
                    except json.JSONDecodeError as e:
                        yield None, tag, f"{path}:{n} is not a JSON object: {e}"
                        continue
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        yield None, tag, f"{path}:{n} has no string {text_field!r} field"
                        continue
                    yield {**record, "text": record.pop(text_field)}, tag, f"{path}:{n}"
        elif suffix == ".parquet":
            for n, record in enumerate(_iter_parquet(path), 1):
                if not isinstance(record.get(text_field), str):
                    yield None, tag, f"{path} row {n} has no string {text_field!r} value"
                    continue
                yield {**record, "text": record.pop(text_field)}, tag, f"{path} row {n}"


def ingest(inputs: list[str | Path], out: str | Path, source: str | None = None, text_field: str = "text",
           min_chars: int = 1, skip_bad: bool = False, overwrite: bool = False, every: int = 1000) -> Stage:
    """Run the ingest stage; returns the finished Stage (its `summary()` is the one-line report)."""
    files = list_files(inputs)
    ignored = [p for p, _ in files if p.suffix.lower() not in SUFFIXES]
    files = [(p, tag) for p, tag in files if p.suffix.lower() in SUFFIXES]
    if not files:
        raise DataError(f"no documents found in {', '.join(map(str, inputs))}: expected .txt, .md, .jsonl "
                        f"or .parquet files ({len(ignored)} other files ignored)")
    settings = {"inputs": [str(Path(i).resolve()) for i in inputs], "source": source, "text_field": text_field,
                "min_chars": min_chars, "skip_bad": skip_bad}
    stage = Stage(out, "ingest", settings, every=every, overwrite=overwrite)
    if stage.done:
        return stage
    stage.extra = {"files": len(files), "ignored files": len(ignored)}
    seen = {d["id"] for d in stage.kept_so_far()}
    with stage:  # an error checkpoints what was consumed so far: a rerun continues from there
        for i, (record, tag, where) in enumerate(progress(_raw_records(files, text_field), desc="ingest")):
            if i < stage.skip:
                continue
            if record is None:
                if not skip_bad:
                    raise DataError(f"{where}; fix or remove it, or pass --skip-bad to skip such input "
                                    "(output so far is kept for resuming)")
                stage.drop(None, "bad-input", where=where)
            else:
                text = normalize(record["text"])
                doc = {"id": doc_id(text), "text": text, "source": source or record.get("source") or tag,
                       **{k: v for k, v in record.items() if k not in ("id", "text", "source")}}
                if len(text) < min_chars:
                    stage.drop(doc, "empty", where=where)
                elif doc["id"] in seen:
                    stage.drop(doc, "exact-duplicate", where=where)
                else:
                    seen.add(doc["id"])
                    stage.keep(doc)
            stage.step()
    stage.finish(allow_empty=False)
    return stage
