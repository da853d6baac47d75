"""`kvrecall worker` as one rank of a tensor-parallel group (WORLD_SIZE > 1 in the environment).

The rank joins the group torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), takes its shard of the model and runs `--sessions` decode sessions against the
daemon at `--target` (the daemon of its own GPU), printing one JSON line per session. The
model is the transformers llama directory named by KVRECALL_TP_MODEL (loaded on the CPU, then
sharded), or without it a small random llama that exercises the whole path. After each
session the ranks compare their retrieval steps and exit 1 if they ever differ.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from kvrecall.client import KVRecallClient
from kvrecall.demo import policy_config
from kvrecall.tp.check import tiny_model
from kvrecall.tp.decode import open_tp_session, tp_decode
from kvrecall.tp.group import TPGroup
from kvrecall.tp.model import TPLlama


def _device(args: argparse.Namespace) -> torch.device:
    """--device / $KVRECALL_DEVICE, else cuda:LOCAL_RANK where there is CUDA, else the CPU."""
    name = args.device or os.environ.get("KVRECALL_DEVICE")
    if name:
        return torch.device(name)
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")


def _load(device: torch.device, group: TPGroup) -> TPLlama:
    path = os.environ.get("KVRECALL_TP_MODEL")
    if not path:
        return TPLlama.from_hf(tiny_model(), group, device)
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return TPLlama.from_hf(hf, group, device)


def run_tp_worker(args: argparse.Namespace) -> int:
    device = _device(args)
    group = TPGroup.from_env("nccl" if device.type == "cuda" else "gloo")
    model = _load(device, group)
    config = policy_config(args.policy, args.budget, args.policy_config)
    vocab = model.shape.vocab
    with KVRecallClient(args.target, args.worker_id, token=args.token) as client:
        for seed in range(args.sessions):
            prompt = torch.randint(
                0, vocab, (1, args.context_tokens), generator=torch.Generator().manual_seed(seed)
            )
            max_tokens = args.context_tokens + args.max_new_tokens + 16
            session, cache = open_tp_session(
                client, model, args.policy, config, max_tokens, tag=f"{args.worker_id}/tp{group.rank}"
            )
            with session:
                result = tp_decode(model, cache, prompt.to(device), args.max_new_tokens)
                stats = session.stats()
            steps = torch.tensor(
                result.boundary_steps + [-1] * (args.max_new_tokens - len(result.boundary_steps))
            )
            agreed = bool((group.gather(steps.to(device)) == steps.to(device)).all())
            print(json.dumps({
                "worker": args.worker_id, "rank": group.rank, "world": group.size, "seed": seed,
                "policy": args.policy, "prompt_tokens": args.context_tokens, "generated_tokens": len(result.tokens),
                "retrievals": stats.boundaries, "ranks_agree": agreed,
                "gpu_resident_tokens": stats.max_resident_tokens,
                "step_ms_median": 1e3 * sorted(result.step_seconds)[len(result.step_seconds) // 2]
                if result.step_seconds else None,
            }), flush=True)  # fmt: skip
            if not agreed:
                group.close()
                return 1
    group.close()
    return 0
