"""kvrecall: a KV-cache manager for long-context and long-reasoning LLM inference."""

__version__ = "0.1.0"
