"""Evaluation: perplexity (and, through lm-evaluation-harness, zero-shot accuracy and speed)."""

from depthkit.evaluate.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
