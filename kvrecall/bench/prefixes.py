"""N sessions over one shared document: host bytes and the prefill+ingest time of each session.

    python -m kvrecall.bench.prefixes --sessions 32 --document-tokens 4096 --out bench/results/DATE-cpu-prefixes.json

The bundled SmolLM2-135M-Instruct reads one document-first multi-key needle document; every
session declares the document as its prompt's shared prefix and asks one question (the keys'
questions in turn), all sessions held open together. The first session prefills and ingests
the document (and registers it); the others start from it and prefill their question only.
Printed and written (JSON): the host pool's bytes with every session open against one
document's bytes plus the sessions' own (their reserved pages past the prefix), and the
second session's prefill+ingest time against the first's. A ratio from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kvrecall.bench.common import run_metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--document-tokens", type=int, default=4096, help="document length requested, in tokens")
    parser.add_argument("--keys", type=int, default=8, help="secret words in the document (questions cycle over them)")
    parser.add_argument("--policy", default="louiskv")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--page-kb", type=int, default=256, help="the daemon's host page size")
    parser.add_argument("--host-pool-gb", type=float, default=4.0)
    parser.add_argument("--device-pool-gb", type=float, default=2.0,
                        help="the daemon's device pool (working sets and each session's policy metadata)")
    parser.add_argument("--device", default="cpu", help="the model's and the daemon's device")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)

    from kvrecall.client import KVRecallClient
    from kvrecall.client.hf import model_fingerprint
    from kvrecall.demo import questions_about_one_document
    from kvrecall.local import LocalDaemon
    from kvrecall.models.smollm import load_model
    from kvrecall.prefix import declare
    from kvrecall.worker import decode, open_model_session

    device = torch.device(args.device)
    model, tokenizer = load_model(device=args.device)
    document, questions = questions_about_one_document(args.document_tokens, args.keys, 0, tokenizer)
    doc_ids = tokenizer(document, return_tensors="pt").input_ids.to(device)
    asked = [tokenizer(q, return_tensors="pt", add_special_tokens=False).input_ids.to(device) for q, _ in questions]
    max_tokens = doc_ids.shape[1] + max(q.shape[1] for q in asked) + args.max_new_tokens + 16
    declaration = declare(doc_ids[0].tolist(), model_fingerprint(model))
    config = {"budget": args.budget}
    rows = []
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(LocalDaemon(
            host_pool_gb=args.host_pool_gb, device_pool_gb=args.device_pool_gb, device=args.device,
            extra_args=["--page-kb", str(args.page_kb)],
        ))  # fmt: skip
        client = stack.enter_context(KVRecallClient(daemon.target, "bench-prefixes", timeout=600.0))
        for i in range(args.sessions):
            question = asked[i % len(asked)]
            session, cache = open_model_session(client, model, args.policy, config, max_tokens, prefix=declaration)
            stack.enter_context(session)
            started = time.perf_counter()
            result = decode(model, cache, torch.cat((doc_ids, question), dim=1), args.max_new_tokens)
            stats = session.stats()
            rows.append({
                "held": session.prefix_held, "prefill_ingest_seconds": result.prefill_seconds,
                "own_host_bytes": stats.host_bytes, "device_bytes": stats.device_bytes,
                "metadata_bytes": stats.metadata_bytes, "tokens": doc_ids.shape[1] + question.shape[1] + len(result.tokens),
                "seconds": time.perf_counter() - started,
            })  # fmt: skip
            print(f"session {i}: prefix held {session.prefix_held}, prefill+ingest {result.prefill_seconds:.2f} s",
                  file=sys.stderr, flush=True)
        stats = client.stats()
        host = next(p for p in stats.pools if p.tier == "host")
        prefix = next(p for p in stats.prefixes if p.prefix_id == declaration.chunk_hashes[-1].hex())
    page = args.page_kb * 1024
    token_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads) * 4
    document_bytes = doc_ids.shape[1] * token_bytes
    own_bytes = sum(r["own_host_bytes"] for r in rows)
    own_tokens_bytes = sum(r["tokens"] - doc_ids.shape[1] for r in rows) * token_bytes
    unshared = args.sessions * -(-max_tokens * token_bytes // page) * page
    report = {
        "meta": {**run_metadata(device, []), "command": " ".join([sys.executable, "-m", "kvrecall.bench.prefixes", *(argv or sys.argv[1:])]),
                 "model": "SmolLM2-135M-Instruct (bundled GGUF, fp32)"},
        "sessions": args.sessions, "document_tokens": int(doc_ids.shape[1]), "max_tokens": max_tokens,
        "policy": args.policy, "budget": args.budget, "page_bytes": page,
        "host_used_bytes": host.used_bytes, "prefix_host_bytes": prefix.host_bytes, "prefix_refs": prefix.refs,
        "sessions_own_host_bytes": own_bytes, "document_bytes": document_bytes,
        # the daemon reserves each session's max_tokens past the prefix, in whole pages
        "host_bytes_ratio": host.used_bytes / (document_bytes + own_bytes),
        "host_bytes_ratio_to_tokens_written": host.used_bytes / (document_bytes + own_tokens_bytes),
        "host_bytes_unshared": unshared,
        "first_prefill_ingest_seconds": rows[0]["prefill_ingest_seconds"],
        "second_prefill_ingest_seconds": rows[1]["prefill_ingest_seconds"] if len(rows) > 1 else None,
        "second_to_first_ingest_ratio": rows[1]["prefill_ingest_seconds"] / rows[0]["prefill_ingest_seconds"] if len(rows) > 1 else None,
        "rest_prefill_ingest_seconds_median": statistics.median(r["prefill_ingest_seconds"] for r in rows[1:]) if len(rows) > 1 else None,
        "held": [r["held"] for r in rows],
        # each session's device pool bytes: its working set and its policy metadata (a session
        # over a held prefix gets its own copy of the prefix's policy index)
        "device_bytes_per_session": [r["device_bytes"] for r in rows],
        "metadata_bytes_per_session": [r["metadata_bytes"] for r in rows],
    }
    print(f"{'sessions':>10} {'doc tokens':>11} {'host used MiB':>14} {'unshared MiB':>13} {'bytes ratio':>12} "
          f"{'1st s':>8} {'2nd s':>8} {'2nd/1st':>8}")
    print(f"{args.sessions:>10} {report['document_tokens']:>11} {host.used_bytes / 2**20:>14.1f} {unshared / 2**20:>13.1f} "
          f"{report['host_bytes_ratio']:>12.3f} {report['first_prefill_ingest_seconds']:>8.2f} "
          f"{report['second_prefill_ingest_seconds'] or 0:>8.2f} {report['second_to_first_ingest_ratio'] or 0:>8.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
