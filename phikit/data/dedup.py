"""Near-duplicate removal with MinHash LSH (datasketch).

Each document becomes the set of its word n-grams (lowercased \\w+ words, n=5 by default, as in
FineWeb); its MinHash signature estimates the Jaccard similarity of two such sets. Documents stream
through in order: one whose signature collides in the LSH index with an already kept document of
estimated Jaccard >= threshold is dropped as a near-duplicate of it; otherwise it is kept and indexed.
So the first document of each cluster survives. A cluster is a kept document with at least one
dropped near-duplicate; the summary reports how many clusters and documents were removed, and
OUT.removed.jsonl names, per dropped document, the kept one it duplicates (`duplicate_of`).

LSH finds pairs above the threshold with high probability, not certainty (datasketch picks bands and
rows to balance false positives and negatives), and each candidate is checked against the estimated
Jaccard, so a dropped document really is estimated similar to its kept one.

Limitation: the LSH index and one signature per kept document (num_perm x 8 bytes, ~1 KB at 128)
stay in memory; corpora of tens of millions of documents need sharding (e.g. per source) or
datasketch's Redis storage, which phikit does not set up.

References: Broder 1997 (MinHash); Lee et al. 2022, "Deduplicating training data makes language
models better"; FineWeb's MinHash settings (5-grams); datasketch `MinHashLSH`.
"""

from __future__ import annotations

import re
from pathlib import Path

from .docs import DataError, Stage, count_documents, iter_documents, progress, require

_WORD = re.compile(r"\w+")


def shingles(text: str, ngram: int = 5) -> set[bytes]:
    """The word n-grams of text (lowercased), as bytes; a text shorter than n words is one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) <= ngram:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)}


def minhash(text: str, ngram: int = 5, num_perm: int = 128, seed: int = 1):
    datasketch = require("datasketch", "near-duplicate removal")
    m = datasketch.MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(shingles(text, ngram)))
    return m


def dedup(inputs: list[str | Path], out: str | Path, threshold: float = 0.8, ngram: int = 5, num_perm: int = 128,
          seed: int = 1, overwrite: bool = False, every: int = 1000) -> Stage:
    """Run the near-duplicate stage; returns the finished Stage."""
    datasketch = require("datasketch", "near-duplicate removal")
    if not 0 < threshold <= 1:
        raise DataError(f"threshold must lie in (0, 1], got {threshold}")
    total = count_documents(inputs)
    if total == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents to deduplicate")
    settings = {"inputs": [str(Path(i).resolve()) for i in inputs], "threshold": threshold, "ngram": ngram,
                "num_perm": num_perm, "seed": seed}
    stage = Stage(out, "dedup", settings, every=every, overwrite=overwrite)
    if stage.done:
        return stage
    try:
        lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
    except ValueError as e:  # e.g. too few bands for a threshold near 1
        raise DataError(f"no LSH index for threshold {threshold} with {num_perm} permutations ({e}); "
                        "raise --num-perm or lower --threshold") from None
    signatures = {}  # kept id -> MinHash, to confirm LSH candidates by their estimated Jaccard
    for doc in stage.kept_so_far():  # resuming: index what was already kept
        signatures[doc["id"]] = m = minhash(doc["text"], ngram, num_perm, seed)
        lsh.insert(doc["id"], m)
    clusters = {r["duplicate_of"] for r in stage.removed_so_far() if r.get("duplicate_of")}
    with stage:
        for i, doc in enumerate(progress(iter_documents(inputs), total=total, desc="dedup")):
            if i < stage.skip:
                continue
            m = minhash(doc["text"], ngram, num_perm, seed)
            similar = [(signatures[k].jaccard(m), k) for k in lsh.query(m)]
            similar = [(j, k) for j, k in similar if j >= threshold]
            if similar:
                jaccard, kept = max(similar)
                stage.drop(doc, "near-duplicate", duplicate_of=kept, jaccard=round(jaccard, 3))
                clusters.add(kept)
            elif doc["id"] in signatures:  # an exact duplicate that ingest did not see (e.g. several inputs)
                stage.drop(doc, "exact-duplicate", duplicate_of=doc["id"], jaccard=1.0)
                clusters.add(doc["id"])
            else:
                signatures[doc["id"]] = m
                lsh.insert(doc["id"], m)
                stage.keep(doc)
            stage.step()
    stage.extra = {"clusters": len(clusters)}
    stage.finish()
    return stage
