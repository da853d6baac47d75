"""Task type for windowkv: localisation / QA vs aggregation, read from the prompt's text by a shipped
classifier that works for any model (classifier.py)."""

from kvrecall.tasktype.classifier import TaskClassifier, classify, shipped, with_task

__all__ = ["TaskClassifier", "classify", "shipped", "with_task"]
