"""A serving worker: OpenAI-compatible HTTP over a model that decodes through the daemon
(`kvrecall worker --serve`; needs the `serve` extra: FastAPI + uvicorn)."""
