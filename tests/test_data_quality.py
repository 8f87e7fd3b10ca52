"""The educational-value classifier: it separates planted high / low quality pages, saves without pickle,
scores a corpus resumably, and trains from a file, a heuristic or a (fake) OpenAI-compatible teacher."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from phikit.commands.data import main as data_main
from phikit.data import quality
from phikit.data.docs import DataError
from phikit.data.ingest import ingest

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
GOOD, BAD = {"edu", "textbook"}, {"chatty", "spam", "boilerplate"}


@pytest.fixture(scope="module")
def trained():
    texts, labels = quality.read_labels(CORPUS / "labels.jsonl")
    return quality.train(texts, labels, n_features=2**16)


@pytest.fixture(scope="module")
def docs_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "docs.jsonl"
    ingest([CORPUS / "web", CORPUS / "textbook"], out)
    return out


def test_separates_planted_quality(trained, docs_path):
    clf, metrics = trained
    assert metrics["train"] == 180 and metrics["held_out"] == 20 and metrics["held_out_accuracy"] >= 0.9
    docs = [json.loads(line) for line in open(docs_path)]
    docs = [d for d in docs if d.get("kind", d["source"]) in GOOD | BAD]
    truth = np.array([d.get("kind", d["source"]) in GOOD for d in docs])
    scores = clf.score([d["text"] for d in docs])
    # the corpus pages are not in labels.jsonl (other seed), though they share its sentence templates;
    # measured accuracy 1.0 on these 223 pages (edu/textbook >= 0.86, chatty/spam/boilerplate <= 0.12)
    assert len(docs) == 223 and ((scores >= clf.threshold) == truth).mean() >= 0.95
    assert clf.threshold == 0.5 and np.all((scores >= 0) & (scores <= 1))


def test_save_load_roundtrip_without_pickle(trained, tmp_path):
    clf, _ = trained
    path = clf.save(tmp_path / "q.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle stream
    again = quality.QualityClassifier.load(path)
    texts = ["Fractions describe equal parts of a whole.", "BUY NOW $$$ cheap watches!!!"]
    np.testing.assert_allclose(again.score(texts), clf.score(texts), rtol=1e-6)
    assert (again.n_features, again.ngram, again.threshold) == (clf.n_features, clf.ngram, clf.threshold)
    (tmp_path / "bad.safetensors").write_bytes(b"not a classifier")
    with pytest.raises(DataError, match="not a phikit quality classifier"):
        quality.QualityClassifier.load(tmp_path / "bad.safetensors")


def test_multiclass_labels_score_on_the_label_scale():
    texts = ["bad spam spam"] * 10 + ["ok text about things"] * 10 + ["great lesson on photosynthesis"] * 10
    clf, _ = quality.train(texts, [0] * 10 + [3] * 10 + [5] * 10, n_features=2**10, holdout=0)
    s = clf.score(["bad spam spam", "great lesson on photosynthesis"])
    assert clf.threshold == 2.5 and s[0] < 1.5 and s[1] > 3.5
    with pytest.raises(DataError, match="at least two classes"):
        quality.train(["a", "b"], [1, 1])


def test_score_stage_and_resume(trained, docs_path, tmp_path):
    clf, _ = trained
    clf.save(tmp_path / "q.safetensors")
    stage = quality.score_documents([docs_path], tmp_path / "scored.jsonl", tmp_path / "q.safetensors", batch_size=64)
    scored = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert len(scored) == stage.counts["in"] == stage.counts["out"] and all("quality" in d for d in scored)
    assert "at or above the threshold 0.5" in stage.summary()
    again = quality.score_documents([docs_path], tmp_path / "scored.jsonl", tmp_path / "q.safetensors")
    assert again.reused
    # a different classifier is a different setting: not silently reused
    quality.train(["a b", "c d"] * 5, [0, 1] * 5, n_features=2**10)[0].save(tmp_path / "q2.safetensors")
    with pytest.raises(DataError, match="--overwrite"):
        quality.score_documents([docs_path], tmp_path / "scored.jsonl", tmp_path / "q2.safetensors")


def test_heuristic_labeller():
    good = open(CORPUS / "textbook" / "ch01-s1-photosynthesis.md").read()
    assert quality.heuristic_label(good) == 1
    assert quality.heuristic_label("BUY NOW $$$ ### cheap ### !!!") == 0


class _FakeTeacher(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that grades by keyword."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeTeacher.seen.append((self.path, self.headers.get("Authorization"), body["model"]))
        prompt = body["messages"][-1]["content"]
        score = 4 if ("Definition" in prompt or "For example" in prompt) else 1
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": f"The extract is ... Educational score: {score}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher():
    _FakeTeacher.seen = []
    server = HTTPServer(("127.0.0.1", 0), _FakeTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_llm_labeller_with_a_fake_endpoint(teacher, docs_path, tmp_path, monkeypatch, capsys):
    labeller = quality.LLMLabeller(teacher, "teacher-model", api_key="k")
    assert labeller("Definition: a fraction is ...") == 4 and labeller("lol") == 1
    assert _FakeTeacher.seen[0] == ("/v1/chat/completions", "Bearer k", "teacher-model")
    with pytest.raises(DataError, match="labelling endpoint"):
        quality.LLMLabeller("http://127.0.0.1:9/v1", "m", timeout=2)("text")
    # the whole command: label a sample with the teacher, train, score
    monkeypatch.setenv("TEACHER_KEY", "secret")
    clf_path = tmp_path / "q.safetensors"
    data_main(["score", str(docs_path), "-o", str(tmp_path / "scored.jsonl"), "--classifier", str(clf_path),
               "--label-with", "llm", "--llm-url", teacher, "--llm-model", "m", "--llm-api-key-env", "TEACHER_KEY",
               "--label-sample", "60", "--n-features", "4096"])
    assert _FakeTeacher.seen[-1][1] == "Bearer secret"
    labels = [json.loads(line) for line in open(tmp_path / "q.labels.jsonl")]
    assert len(labels) == 60 and {x["label"] for x in labels} == {1.0, 4.0}
    clf = quality.QualityClassifier.load(clf_path)
    assert list(clf.classes) == [1.0, 4.0] and clf.threshold == 2.5
    assert capsys.readouterr().out.startswith("score: 272 documents in, 272 out")


def test_score_without_labels_is_a_clear_error(docs_path, tmp_path):
    with pytest.raises(SystemExit, match="pass --labels FILE or --label-with"):
        data_main(["score", str(docs_path), "-o", str(tmp_path / "s.jsonl"), "--classifier",
                   str(tmp_path / "none.safetensors")])
