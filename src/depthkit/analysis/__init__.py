"""Where a model's depth is redundant: block influence, angular distance, CKA."""

from depthkit.analysis.redundancy import RedundancyReport, analyze_redundancy

__all__ = ["RedundancyReport", "analyze_redundancy"]
