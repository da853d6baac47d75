"""The model a serving worker runs: the bundled SmolLM2 test model, or a transformers model
directory (e.g. a mounted volume), loaded offline.

A directory must hold a llama-architecture causal LM (config.json + weights) and its tokenizer,
as written by ``save_pretrained``; kvrecall's attention replaces the model's own.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from kvrecall.models import smollm

BUNDLED = "smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
# Tokens that end a turn in the chat formats of the models we serve, besides the config's EOS.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and what serving needs to know about it."""

    model: Any
    tokenizer: Any
    name: str  # the id /v1/models lists and requests name
    max_positions: int  # the model's context window in tokens
    eos_token_ids: frozenset[int]


def load(model: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `model`: None or "smollm2" for the bundled test model, otherwise a directory path."""
    if model in (None, "", BUNDLED):
        hf_model, tokenizer = smollm.load_model(device=device, dtype=dtype)
        name = BUNDLED_NAME
    else:
        path = pathlib.Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
        smollm.set_offline()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        hf_model.to(device)
        hf_model.eval()
        name = path.name
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        name=name,
        max_positions=int(getattr(hf_model.config, "max_position_embeddings", 2048)),
        eos_token_ids=frozenset(eos_ids(hf_model, tokenizer)),
    )


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the config's and tokenizer's EOS, and end-of-turn tokens."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN if token in vocab)
    return ids
