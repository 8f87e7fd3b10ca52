"""Evaluation: perplexity and agreement between two models on held-out text."""
