"""lm-eval-harness tasks run by `phikit eval`: the task names lm-eval knows, on phikit's loaded model.

lm-eval reads its datasets from the Hugging Face hub (or its cache), so this needs lm-eval installed
(`pip install phikit[eval]`) and, for most tasks, network access or a filled cache.
"""

from __future__ import annotations

from .harness import PhikitLM


def task_manager(include_path: str | None = None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_lm_eval(model, tokenizer, source: str, names: list[str], shots: int, limit: int | None,
                chat: bool, include_path: str | None = None) -> dict[str, tuple[dict, list[dict]]]:
    """{task: (result, samples)} in phikit's result format, from lm-eval's simple_evaluate."""
    import lm_eval

    lm = PhikitLM.from_loaded(model, tokenizer, source)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots or None, limit=limit,
                                  apply_chat_template=chat, fewshot_as_multiturn=chat and bool(shots),
                                  log_samples=True, task_manager=task_manager(include_path))
    results = {}
    for task, metrics in out["results"].items():
        values = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or "_stderr" in key or key in ("sample_len",):
                continue
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            values[key.split(",")[0]] = {"value": float(value),
                                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else 0.0}
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        settings = {"chat": chat, "shots": shots, "prompt_format": "lm-eval task" + (" (chat template)" if chat else ""),
                    "lm_eval_version": lm_eval.__version__}
        samples = [{"doc_id": s.get("doc_id"), "target": str(s.get("target")), "filtered_resps": str(s.get("filtered_resps"))}
                   for s in out.get("samples", {}).get(task, [])]
        results[task] = ({"metrics": values, "n": n, "settings": settings}, samples)
    return results
