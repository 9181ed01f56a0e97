"""depthkit: make transformers cheaper by working on their depth."""

__version__ = "0.1.0"
