"""Task type for windowkv: localisation / QA vs aggregation, classified offline (classifier.py)."""

from kvrecall.tasktype.classifier import TaskClassifier, classify, shipped, with_task

__all__ = ["TaskClassifier", "classify", "shipped", "with_task"]
