"""Evaluation: perplexity, zero-shot accuracy (through lm-evaluation-harness), speed, and reports
comparing a base model with its compressed or looped versions."""

from depthkit.evaluate.perplexity import PerplexityResult, perplexity
from depthkit.evaluate.speed import SpeedResult, measure_speed
from depthkit.evaluate.zeroshot import ZeroShotResult, zero_shot

__all__ = ["PerplexityResult", "SpeedResult", "ZeroShotResult", "measure_speed", "perplexity", "zero_shot"]
