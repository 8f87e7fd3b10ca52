"""Documents on disk, and the resumable writer that every document stage (ingest, dedup, score, filter) uses.

A document is one JSON object per line: {"id": sha1 of the text, "text": ..., "source": tag, ...}.
Stages add fields (dedup nothing, score "quality") and keep the others. Stages read jsonl, or parquet
files with a `text` column (through pyarrow); they write jsonl.

Resuming. A stage writing OUT keeps its work in OUT.partial (and the log of removed documents in
OUT.removed.jsonl.partial). Every `every` input documents it flushes both and records, in
OUT.partial.state.json, the stage settings, how many input documents it has consumed, the byte
length of both files and the counts so far. Run again with the same settings, it truncates the
files to those lengths and skips that many input documents, so a killed run continues where it
last checkpointed. At the end it writes OUT.stats.json and renames the partial files into place
(atomic), so OUT is either absent, a previous complete output, or the new complete output; never
half written. A complete OUT with an OUT.stats.json of the same settings makes the stage a no-op.

References: datatrove's pipeline of readers / filters / writers with removed-document logs
(FineWeb), without its executor.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator


class DataError(ValueError):
    """Input that a data stage cannot use; the message names the file (and line) and what to do."""


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_documents(paths: Iterable[str | os.PathLike], text_field: str = "text") -> Iterator[dict]:
    """Documents from jsonl or parquet files, in order; each must carry a string `text_field`."""
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path} does not exist or is not a file")
        if path.suffix == ".parquet":
            for n, doc in enumerate(_iter_parquet(path), 1):
                if not isinstance(doc.get(text_field), str):
                    raise DataError(f"{path} row {n} has no string {text_field!r} column value")
                yield doc
            continue
        for n, line in _open_lines(path):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not a JSON object: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
                raise DataError(f"{path}:{n} has no string {text_field!r} field")
            yield doc


def _iter_parquet(path: Path) -> Iterator[dict]:
    pq = require("pyarrow.parquet", "parquet files")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path} is not a readable parquet file: {e}") from None
    for batch in pf.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def count_documents(paths: Iterable[str | os.PathLike]) -> int:
    """Number of documents in jsonl / parquet files (non-empty lines; parquet row counts), for progress bars."""
    total = 0
    for path in map(Path, paths):
        if path.suffix == ".parquet":
            total += require("pyarrow.parquet", "parquet files").ParquetFile(path).metadata.num_rows
        elif path.is_file():
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
    return total


def require(module: str, what: str):
    """Import an optional dependency of the [data] extra, or exit with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{what} need the {module.split('.')[0]} package: pip install 'phikit[data]'") from None


def progress(iterable=None, total=None, desc=None, unit="doc"):
    """A tqdm bar on stderr; silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)


class Stage:
    """Resumable jsonl output of one stage: `keep(doc)`, `drop(doc, reason)`, `step()` per input document.

        stage = Stage(out, "dedup", settings)
        if not stage.done:
            with stage:  # an error checkpoints, so a rerun continues
                for doc in docs[stage.skip:]: ...; stage.step()
            stage.finish()
        print(stage.summary())
    """

    def __init__(self, out: str | os.PathLike, name: str, settings: dict, every: int = 1000, overwrite: bool = False):
        self.out, self.name, self.every = Path(out), name, every
        self.settings = {"stage": name, **settings}
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.removed_out = self.out.with_name(self.out.name + ".removed.jsonl")
        self.removed_partial = self.out.with_name(self.removed_out.name + ".partial")
        self.state_path = self.out.with_name(self.out.name + ".partial.state.json")
        self.stats_path = self.out.with_name(self.out.name + ".stats.json")
        self.counts: Counter = Counter()
        self.skip = 0
        self.extra: dict = {}  # stage-specific figures for the summary and stats (e.g. dedup clusters)
        self.done = self.reused = self.resumed = False

        stats = _read_json(self.stats_path)
        if self.out.exists() and not overwrite:
            if stats.get("settings") == self.settings:
                self.done = self.reused = True
                self.counts, self.extra = Counter(stats["counts"]), stats.get("extra", {})
                return
            raise DataError(f"{self.out} already exists and was not made by this {name} run with these settings; "
                            "pass --overwrite to replace it (it is kept until the new output is complete)")
        state = _read_json(self.state_path)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if state.get("settings") == self.settings and self.partial.exists() and self.removed_partial.exists():
            self.skip, self.counts, self.resumed = state["consumed"], Counter(state["counts"]), True
            self._f = open(self.partial, "r+b")
            self._r = open(self.removed_partial, "r+b")
            self._f.truncate(state["bytes"])
            self._r.truncate(state["removed_bytes"])
            self._f.seek(0, os.SEEK_END)
            self._r.seek(0, os.SEEK_END)
        else:
            self._f, self._r = open(self.partial, "wb"), open(self.removed_partial, "wb")
        self._since = 0

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """On an error, checkpoint what was consumed so far (a rerun continues from there) and close."""
        if exc_type is not None and not self.done and not self._f.closed:
            self.checkpoint()
            self._f.close()
            self._r.close()
        return False

    def kept_so_far(self) -> Iterator[dict]:
        """Documents already in the partial output (on resume), to rebuild a stage's state (seen ids, LSH)."""
        if not self.resumed:
            return iter(())
        self._f.flush()
        return iter_documents([self.partial])

    def removed_so_far(self) -> Iterator[dict]:
        if not self.resumed:
            return iter(())
        self._r.flush()
        return (json.loads(line) for line in open(self.removed_partial, encoding="utf-8") if line.strip())

    def keep(self, doc: dict) -> None:
        self._f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
        self.counts["out"] += 1

    def drop(self, doc: dict | None, reason: str, **info) -> None:
        record = {"id": None if doc is None else doc.get("id"), "reason": reason, **info}
        self._r.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.counts[reason] += 1

    def step(self, n: int = 1) -> None:
        """`n` more input documents consumed; checkpoints every `every` of them."""
        self.counts["in"] += n
        self._since += n
        if self._since >= self.every:
            self.checkpoint()

    def checkpoint(self) -> None:
        for f in (self._f, self._r):
            f.flush()
            os.fsync(f.fileno())
        state = {"settings": self.settings, "consumed": self.counts["in"], "bytes": self._f.tell(),
                 "removed_bytes": self._r.tell(), "counts": dict(self.counts)}
        _write_json(self.state_path, state)
        self._since = 0

    def finish(self, allow_empty: bool = True) -> None:
        """Move the complete output into place. With allow_empty=False an empty output is an error and
        nothing is written (the partial files are removed, an earlier OUT is untouched)."""
        self._f.close()
        self._r.close()
        if not allow_empty and self.counts["out"] == 0:
            self.abort()
            raise DataError(f"{self.name}: no documents to write ({self.summary()}); nothing was written")
        _write_json(self.stats_path, {"settings": self.settings, "counts": dict(self.counts), "extra": self.extra})
        os.replace(self.removed_partial, self.removed_out)
        os.replace(self.partial, self.out)
        self.state_path.unlink(missing_ok=True)
        self.done = True

    def abort(self) -> None:
        for f in (self._f, self._r):
            f.close()
        for p in (self.partial, self.removed_partial, self.state_path):
            p.unlink(missing_ok=True)

    def summary(self) -> str:
        """One line: documents in and out, removed documents by reason."""
        c = self.counts
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("in", "out") and v)
        line = f"{self.name}: {c['in']} documents in, {c['out']} out"
        line += f"; removed: {reasons}" if reasons else "; removed: none"
        line += "".join(f"; {k} {v}" for k, v in self.extra.items())
        return line + f" -> {self.out}" + (" (already complete, nothing to do)" if self.reused else "")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
