"""The "educational value" classifier: hashed word n-grams + logistic regression, trained on labelled examples.

This is the FineWeb-Edu / Phi recipe at its smallest. A teacher (an LLM behind an OpenAI-compatible
endpoint, a heuristic, or a human-labelled file) labels a sample of documents; a cheap classifier
learns those labels and then scores every document; documents above a threshold are kept.

Features: scikit-learn's `HashingVectorizer` (lowercased word 1..2-grams hashed into 2**18 buckets
by MurmurHash3, l2-normalised), which is stateless, so the saved classifier is just the weights.
Model: `LogisticRegression`. Labels are numbers (0/1, or FineWeb-Edu's 0..5 scale); the score of a
document is the expected label under the model, sum_k p(k | doc) * k, so it lives on the label scale
(for 0/1 labels it is p(label = 1)). The default threshold is the middle of the label range.

Saved as one safetensors file (weights) with the featurizer settings in its metadata: no pickle.
Applying it needs scikit-learn only for the (stateless) hashing.

References: Penedo et al. 2024, "The FineWeb datasets" (FineWeb-Edu annotator prompt and classifier);
Gunasekar et al. 2023, "Textbooks are all you need" (Phi-1's filtered web data).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .docs import DataError, Stage, count_documents, iter_documents, progress, require


@dataclass
class QualityClassifier:
    coef: np.ndarray         # (K, F) float32; K = 1 for two classes (sklearn's binary layout)
    intercept: np.ndarray    # (K,)
    classes: np.ndarray      # (C,) label values, ascending
    n_features: int = 2**18
    ngram: int = 2
    threshold: float = field(default=None)  # default: the middle of the label range

    def __post_init__(self):
        if self.threshold is None:
            self.threshold = float(self.classes.min() + self.classes.max()) / 2

    def features(self, texts: list[str]):
        """(N, F) sparse l2-normalised hashed n-gram counts."""
        fe = require("sklearn.feature_extraction.text", "the quality classifier")
        vec = fe.HashingVectorizer(n_features=self.n_features, ngram_range=(1, self.ngram), alternate_sign=False,
                                   lowercase=True, norm="l2")
        return vec.transform(texts)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(N, C) class probabilities."""
        logits = np.asarray(self.features(texts) @ self.coef.T) + self.intercept  # (N, K)
        if self.coef.shape[0] == 1:  # binary: one logit for the larger class
            p = 1 / (1 + np.exp(-logits[:, 0]))
            return np.stack([1 - p, p], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def score(self, texts: list[str]) -> np.ndarray:
        """(N,) expected label value of each text."""
        return self.probabilities(texts) @ self.classes.astype(np.float64)

    def predict(self, texts: list[str]) -> np.ndarray:
        return self.classes[self.probabilities(texts).argmax(axis=1)]

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "phikit-quality-1", "n_features": str(self.n_features), "ngram": str(self.ngram),
                "threshold": repr(self.threshold), "features": "sklearn HashingVectorizer, word 1..ngram, l2"}
        tmp = path.with_name(path.name + ".tmp")
        save_file({"coef": self.coef.astype(np.float32), "intercept": self.intercept.astype(np.float32),
                   "classes": self.classes.astype(np.float64)}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in ("coef", "intercept", "classes")}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise DataError(f"{path} is not a phikit quality classifier: {e}") from None
        if meta.get("format") != "phikit-quality-1":
            raise DataError(f"{path} is not a phikit quality classifier (format {meta.get('format')!r})")
        return cls(t["coef"], t["intercept"], t["classes"], int(meta["n_features"]), int(meta["ngram"]),
                   float(meta["threshold"]))


def train(texts: list[str], labels: list[float], n_features: int = 2**18, ngram: int = 2, c: float = 4.0,
          holdout: float = 0.1, seed: int = 0) -> tuple[QualityClassifier, dict]:
    """Fit on labelled texts, holding out a random `holdout` fraction; returns (classifier, metrics)."""
    lm = require("sklearn.linear_model", "training the quality classifier")
    if len(texts) != len(labels) or not texts:
        raise DataError("training the quality classifier needs the same, non-zero number of texts and labels")
    y = np.asarray(labels, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise DataError(f"all {len(y)} training labels are {y[0]:g}: the classifier needs at least two classes")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_test = int(round(len(texts) * holdout)) if len(texts) >= 10 else 0
    test, fit = order[:n_test], order[n_test:]
    clf = QualityClassifier(np.zeros((1, n_features), np.float32), np.zeros(1), np.unique(y), n_features, ngram)
    model = lm.LogisticRegression(C=c, max_iter=1000)
    model.fit(clf.features([texts[i] for i in fit]), y[fit])
    clf.coef, clf.intercept, clf.classes = model.coef_.astype(np.float32), model.intercept_, model.classes_
    metrics = {"train": len(fit), "held_out": len(test)}
    if len(test):
        metrics["held_out_accuracy"] = float((clf.predict([texts[i] for i in test]) == y[test]).mean())
    return clf, metrics


def read_labels(path: str | Path) -> tuple[list[str], list[float]]:
    """Texts and labels from a jsonl file of {"text": ..., "label": number}."""
    texts, labels = [], []
    for n, doc in enumerate(iter_documents([path]), 1):
        if not isinstance(doc.get("label"), (int, float)) or isinstance(doc.get("label"), bool):
            raise DataError(f"{path}: record {n} has no numeric 'label'")
        texts.append(doc["text"])
        labels.append(float(doc["label"]))
    if not texts:
        raise DataError(f"{path} holds no labelled examples")
    return texts, labels


def heuristic_label(text: str) -> int:
    """1 when the text passes every default heuristic rule of filter.py, else 0: a teacher with no model."""
    from .filter import default_rules, first_failure

    return int(first_failure(text, default_rules()) is None)


# The FineWeb-Edu annotation prompt, shortened: an additive 0..5 educational-value scale.
LLM_PROMPT = """Below is an extract from a web page. Evaluate whether the page has a high educational value and \
could be useful in an educational setting for teaching from primary school to grade school levels using the \
additive 5-point scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the extract provides some basic information relevant to educational topics, even if it includes \
some irrelevant or non-academic content like advertisements and promotional material.
- Add another point if the extract addresses certain elements pertinent to education but does not align closely \
with educational standards.
- Award a third point if the extract is appropriate for educational use and introduces key concepts relevant to \
school curricula.
- Grant a fourth point if the extract is highly relevant and beneficial for educational purposes for a level not \
higher than grade school, exhibiting a clear and consistent writing style.
- Bestow a fifth point if the extract is outstanding in its educational value, perfectly suited for teaching.

The extract:
{text}

After examining the extract, briefly justify your total score, up to 100 words. Conclude with the score using \
the format: "Educational score: <total points>\""""


class LLMLabeller:
    """Labels a text 0..5 by asking a chat model behind an OpenAI-compatible /chat/completions endpoint
    (e.g. `phikit serve`, vLLM, llama.cpp's server). Returns None when the reply holds no score."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_chars: int = 4000):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout, self.max_chars = model, api_key, timeout, max_chars

    def __call__(self, text: str) -> int | None:
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 256,
                "messages": [{"role": "user", "content": LLM_PROMPT.format(text=text[:self.max_chars])}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as e:
            raise DataError(f"the labelling endpoint {self.url} failed: {e}") from None
        m = re.search(r"Educational score:\s*([0-5])", reply or "")
        return int(m.group(1)) if m else None


def sample_texts(inputs: list, n: int, seed: int = 0) -> list[str]:
    """A reproducible random sample of n document texts (reservoir sampling over the stream)."""
    rng, sample = random.Random(seed), []
    for i, doc in enumerate(iter_documents(inputs)):
        if i < n:
            sample.append(doc["text"])
        elif (j := rng.randrange(i + 1)) < n:
            sample[j] = doc["text"]
    return sample


def label_texts(texts: list[str], labeller) -> tuple[list[str], list[float]]:
    """Apply a labeller (text -> number or None) with a progress bar; texts it cannot label are left out."""
    pairs = [(t, labeller(t)) for t in progress(texts, desc="label")]
    kept = [(t, float(y)) for t, y in pairs if y is not None]
    return [t for t, _ in kept], [y for _, y in kept]


def score_documents(inputs: list, out, classifier_path: str | Path, batch_size: int = 256,
                    overwrite: bool = False, every: int = 1000) -> Stage:
    """The score stage: add a "quality" field (the classifier's score) to every document."""
    clf = QualityClassifier.load(classifier_path)
    total = count_documents(inputs)
    if total == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents to score")
    digest = hashlib.sha1(Path(classifier_path).read_bytes()).hexdigest()
    settings = {"inputs": [str(Path(i).resolve()) for i in inputs], "classifier": digest}
    stage = Stage(out, "score", settings, every=every, overwrite=overwrite)
    if stage.done:
        return stage
    batch: list[dict] = []
    above = sum(d["quality"] >= clf.threshold for d in stage.kept_so_far())

    def flush():
        nonlocal above
        for doc, s in zip(batch, clf.score([d["text"] for d in batch])):
            q = round(float(s), 4)
            stage.keep({**doc, "quality": q})
            above += q >= clf.threshold
            stage.step()
        batch.clear()

    with stage:
        for i, doc in enumerate(progress(iter_documents(inputs), total=total, desc="score")):
            if i >= stage.skip:
                batch.append(doc)
                if len(batch) == batch_size:
                    flush()
        flush()
    stage.extra = {f"at or above the threshold {clf.threshold:g}": int(above)}
    stage.finish()
    return stage
