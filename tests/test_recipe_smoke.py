"""The whole training recipe on the tiny corpus: data pipeline -> two-phase pretraining -> phikit generate.

ingest -> dedup -> score (train the quality classifier) -> filter -> tokenizer -> pack, for a
"web" source (the corpus's web pages) and a "synthetic" source (its textbook sections and notes);
then `phikit pretrain` runs phase 1 on raw web and phase 2 on filtered web + synthetic, and
`phikit generate` loads the exported model.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from phikit.commands.data import main as data
from phikit.recipes.pretrain import main as pretrain

CORPUS = Path(__file__).parent / "fixtures" / "corpus"


def test_data_pipeline_to_pretraining_to_generate(tmp_path):
    t0 = time.perf_counter()
    w = tmp_path
    assert data(["ingest", str(CORPUS / "web"), "-o", str(w / "web.jsonl")]) in (0, None)
    assert data(["ingest", str(CORPUS / "textbook"), str(CORPUS / "notes"), "--source", "synthetic",
                 "-o", str(w / "synthetic.jsonl")]) in (0, None)
    assert data(["dedup", str(w / "web.jsonl"), "-o", str(w / "web.dedup.jsonl")]) in (0, None)
    assert data(["score", str(w / "web.dedup.jsonl"), "-o", str(w / "web.scored.jsonl"), "--classifier",
                 str(w / "quality.safetensors"), "--labels", str(CORPUS / "labels.jsonl")]) in (0, None)
    assert data(["filter", str(w / "web.scored.jsonl"), "-o", str(w / "filtered_web.jsonl"),
                 "--min-quality", "0.5"]) in (0, None)
    assert data(["tokenizer", str(w / "web.dedup.jsonl"), str(w / "synthetic.jsonl"), "-o", str(w / "tokenizer"),
                 "--vocab-size", "1000"]) in (0, None)
    for name in ("web.dedup", "filtered_web", "synthetic"):
        assert data(["pack", str(w / f"{name}.jsonl"), "--tokenizer", str(w / "tokenizer"), "-o",
                     str(w / "packed" / name), "--shard-tokens", "4096", "--val-fraction", "0.1"]) in (0, None)
    kept = sum(1 for _ in open(w / "filtered_web.jsonl"))
    assert 0 < kept < sum(1 for _ in open(w / "web.dedup.jsonl"))  # the filter removed something, not everything

    vocab = json.loads((w / "packed" / "synthetic" / "manifest.json").read_text())["vocab_size"]
    config = {
        "seed": 0,
        "model": {"preset": "phi-3-mini-4k-instruct", "n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 4,
                  "ffn_dim": 128, "vocab_size": -(-vocab // 64) * 64, "max_seq_len": 128,
                  "original_max_seq_len": 128},
        "tokenizer": str(w / "tokenizer"),
        "data": {"seq_len": 64, "sources": {"web": str(w / "packed" / "web.dedup"),
                                            "filtered_web": str(w / "packed" / "filtered_web"),
                                            "synthetic": str(w / "packed" / "synthetic")}},
        "phases": [{"name": "phase1", "tokens": 4 * 8 * 64, "mixture": {"web": 1.0}},
                   {"name": "phase2", "tokens": 4 * 8 * 64, "mixture": {"filtered_web": 0.6, "synthetic": 0.4}}],
        "optim": {"lr": 3.0e-3, "warmup_steps": 2},
        "train": {"batch_size": 8, "micro_batch": 4, "threads": 1, "eval_every": 4, "checkpoint_every": 4},
    }
    (w / "pretrain.json").write_text(json.dumps(config))
    assert pretrain(["--config", str(w / "pretrain.json"), "--out", str(w / "run")]) in (0, None)
    steps = [json.loads(line) for line in open(w / "run" / "metrics.jsonl")]
    assert [s["step"] for s in steps] == list(range(1, 9)) and {s["phase"] for s in steps} == {"phase1", "phase2"}
    assert steps[-1]["loss"] < steps[0]["loss"]
    out = subprocess.run([sys.executable, "-m", "phikit", "generate", "--model", str(w / "run" / "final"),
                          "--prompt", "The water cycle", "--max-new-tokens", "8"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    assert time.perf_counter() - t0 < 120
