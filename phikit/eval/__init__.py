"""Evaluation: `phikit eval` (tasks.py, loglik.py, generation.py, run.py, report.py; sandbox.py for code, safety.py
for the safety benchmark; harness.py makes phikit an lm-eval-harness model) and the quantization gate's
perplexity and agreement between two models on held-out text (perplexity.py)."""
