"""What a training recipe reads and writes besides tensors: its config file, metrics.jsonl and loss.png.

`read_config(path, defaults)` reads YAML or JSON and merges it over the recipe's DEFAULTS: each
top-level key must be one of them, and each key of a dict section one of that section's keys (a typo
is an error, not a silently ignored setting). `metrics.jsonl` holds one JSON object per optimizer step;
after a resume the lines past the checkpoint are dropped (they are recomputed, identically).
`plot_losses` draws train and validation curves to a PNG, written atomically.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path


class RunFileError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def read_config(path: Path, defaults: dict, free_sections: tuple[str, ...] = ()) -> dict:
    """The file merged over defaults (a deep copy); free_sections are dicts whose keys are not checked."""
    try:
        text = path.read_text()
        if path.suffix == ".json":
            raw = json.loads(text)
        elif importlib.util.find_spec("yaml") is None:
            raise RunFileError(f"{path}: YAML configs need pyyaml: pip install 'phikit[train]' (or write it as .json)")
        else:
            import yaml
            raw = yaml.safe_load(text)
    except (OSError, ValueError) as e:  # yaml.YAMLError and JSONDecodeError are ValueErrors
        if isinstance(e, RunFileError):
            raise
        raise RunFileError(f"cannot read config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise RunFileError(f"{path}: expected a mapping of sections ({', '.join(defaults)})")
    cfg = json.loads(json.dumps(defaults))
    for key, value in raw.items():
        if key not in defaults:
            raise RunFileError(f"{path}: unknown key {key!r} (known: {', '.join(defaults)})")
        if isinstance(defaults[key], dict) and key not in free_sections:
            if not isinstance(value, dict):
                raise RunFileError(f"{path}: {key} must be a mapping (keys: {', '.join(defaults[key])})")
            unknown = set(value) - set(defaults[key])
            if unknown:
                raise RunFileError(f"{path}: unknown key {key}.{sorted(unknown)[0]} (known: {', '.join(defaults[key])})")
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def restart_metrics(path: Path, upto_step: int) -> list[dict]:
    """Rewrite metrics.jsonl keeping the records of steps <= upto_step (all of them: 0 starts afresh); return them."""
    records = []
    if upto_step:
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                if (r := json.loads(line))["step"] <= upto_step:
                    records.append(r)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return records


def plot_losses(records: list[dict], path: Path, x: str = "step", val: dict[str, list[tuple]] | None = None,
                marks: list[tuple[float, str]] = ()) -> None:
    """Training loss against x, each validation series {label: [(x, loss), ...]} (default: the records'
    val_loss as "validation"), vertical marks at (x, label); atomic write."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if val is None:
        val = {"validation": [(r[x], r["val_loss"]) for r in records if r.get("val_loss") is not None]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r[x] for r in records], [r["loss"] for r in records], lw=1, label="train")
    for label, pts in val.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=label)
    for pos, name in marks:
        ax.axvline(pos, color="grey", ls="--", lw=0.8)
        ax.text(pos, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="grey")
    ax.set(xlabel=x, ylabel="loss (nats/token)", title=path.parent.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_metrics(records: list[dict], path: Path, panels: list[tuple[str, str]], x: str = "step") -> None:
    """One panel per (metric, title): the training records' metric and its validation twin (`eval_` + metric)
    against x; atomic write."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot([r[x] for r in records if key in r], [r[key] for r in records if key in r], lw=1, label="train")
        val = [(r[x], r["eval_" + key]) for r in records if "eval_" + key in r]
        if val:
            ax.plot(*zip(*val), marker="o", ms=3, lw=1, label="validation")
        ax.set(xlabel=x, title=title)
        ax.legend(fontsize=8)
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
