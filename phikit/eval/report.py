"""What an evaluation run leaves: results.json, a printed table, a bar chart, per-sample jsonl files."""

from __future__ import annotations

import json
from pathlib import Path


def table(results: dict) -> str:
    rows = [("task", "metric", "value", "± stderr", "n", "seconds")]
    for task, r in results["tasks"].items():
        for metric, m in r["metrics"].items():
            rows.append((task, metric, f"{m['value']:.4f}", f"{m['stderr']:.4f}", str(r.get("n", "")),
                         f"{r.get('seconds', 0):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write(out: Path, results: dict, samples: dict[str, list[dict]] | None) -> list[Path]:
    """results.json, results.png (if matplotlib is installed) and, with samples, samples_<task>.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")  # never a half-written file
    for task, rows in (samples or {}).items():
        path = out / f"samples_{task.replace('/', '_').replace(':', '_')}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        written.append(path)
    png = plot(out / "results.png", results)
    if png:
        written.append(png)
    return written


# the metric each task is drawn with (bounded in [0, 1]); perplexity metrics are not comparable bars
_BAR_METRICS = ("acc", "pass@1", "exact_match", "harmful_rate", "over_refusal_rate")


def plot(path: Path, results: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = []
    for task, r in results["tasks"].items():
        for metric, m in r["metrics"].items():
            if metric in _BAR_METRICS or metric.startswith("harmful_rate/") or metric.startswith("acc,"):
                bars.append((f"{task}\n{metric}", m["value"], m["stderr"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(bars) + 1), 3.6))
    ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=3, color="#4C72B0")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7, rotation=30 if len(bars) > 4 else 0, ha="right"
                  if len(bars) > 4 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (± stderr)")
    ax.set_title(f"{results['model']} ({'chat' if results.get('chat') else 'plain text'})", fontsize=9)
    for i, b in enumerate(bars):
        ax.text(i, min(b[1] + 0.02, 0.95), f"{b[1]:.3f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
