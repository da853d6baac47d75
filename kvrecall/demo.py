"""`kvrecall demo`: the bundled test model answers a long-context retrieval prompt through the daemon.

A seeded synthetic prompt hides a 5-digit code in ~N tokens of filler and asks for it. The
model (SmolLM2-135M-Instruct, offline) prefills, hands its KV to the daemon once, and
decodes through the chosen policy. With --json the last stdout line is one JSON object.

With --questions N it asks N questions about one document (N secret codes, each for a word)
through N sessions that declare the document as their shared prefix: the first ingests and
registers it, the rest start from it and prefill their question only; it reports the ingest
time and host bytes of the first session and of the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

POLICY_BUDGET_FIELD = {"louiskv": "budget", "quest": "budget", "snapkv": "budget", "windowkv": "budget", "streaming": "window"}


def budget_config(policy: str, budget: int | None) -> dict | None:
    """The policy config that sets `budget` (None without one); ValueError when `policy` takes none."""
    if budget is None:
        return None
    field = POLICY_BUDGET_FIELD.get(policy)
    if field is None:
        raise ValueError(f"budget does not apply to policy {policy!r} (policies with one: {sorted(POLICY_BUDGET_FIELD)})")
    return {field: budget}


def policy_config(policy: str, budget: int | None, extra: str | None = None) -> dict | None:
    """budget_config for the command line, over the fields of `extra` (--policy-config, a JSON
    object; the daemon validates its fields): exits with the problem."""
    try:
        config = budget_config(policy, budget)
    except ValueError as exc:
        raise SystemExit(f"--{exc}") from None
    if not extra:
        return config
    try:
        fields = json.loads(extra)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--policy-config: not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise SystemExit("--policy-config: must be a JSON object of config fields, e.g. '{\"min_gap\": 0}'")
    return {**fields, **(config or {})}


def run_demo(args: argparse.Namespace) -> int:
    if args.questions:
        return run_questions(args)
    from kvrecall.client import KVRecallClient
    from kvrecall.eval.tasks import demo_sample, score
    from kvrecall.local import LocalDaemon
    from kvrecall.models.smollm import load_model
    from kvrecall.tasktype import with_task
    from kvrecall.worker import decode, open_model_session

    torch.manual_seed(args.seed)
    quiet = args.json
    started = time.perf_counter()

    def say(message: str) -> None:
        print(message, file=sys.stderr if quiet else sys.stdout, flush=True)

    say("loading SmolLM2-135M-Instruct (bundled GGUF, offline) ...")
    model, tokenizer = load_model()
    sample = demo_sample(args.context_tokens, seed=args.seed, tokenizer=tokenizer)
    input_ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
    with contextlib.ExitStack() as stack:
        target = args.target
        if not target:
            say("starting a local daemon ...")
            target = stack.enter_context(LocalDaemon()).target
        client = stack.enter_context(KVRecallClient(target, "demo-worker"))
        max_tokens = input_ids.shape[1] + args.max_new_tokens + 16
        config = with_task(args.policy, policy_config(args.policy, args.budget, args.policy_config), sample.prompt)
        session, cache = open_model_session(client, model, args.policy, config, max_tokens, tag="demo")
        with session:
            eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
            eos.discard(None)
            result = decode(model, cache, input_ids, args.max_new_tokens, eos, progress=not quiet)
            answer = tokenizer.decode(result.tokens, skip_special_tokens=True).strip()
            config = session.policy_config
    report = {
        "policy": args.policy,
        "policy_config": config,
        "prompt_tokens": int(input_ids.shape[1]),
        "generated_tokens": len(result.tokens),
        "answer": answer,
        "expected": sample.answer,
        "correct": bool(score(sample, answer) >= 1.0),
        "retrievals": result.boundaries,
        "appends": result.appends,
        "gpu_resident_tokens": result.max_resident,
        "host_tokens": result.host_tokens,
        "prefill_seconds": round(result.prefill_seconds, 3),
        "decode_seconds": round(result.decode_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "seed": args.seed,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"\nprompt: {report['prompt_tokens']} tokens; the code is {sample.answer}")
        print(f"answer: {answer!r} -> {'correct' if report['correct'] else 'wrong'}")
        print(
            f"policy {args.policy} {json.dumps(config)}: {report['retrievals']} retrievals over "
            f"{report['generated_tokens']} tokens; at most {report['gpu_resident_tokens']} tokens resident "
            f"in the working set, {report['host_tokens']} in the host tier; {report['seconds']} s in all"
        )
    return 0


def questions_about_one_document(context_tokens: int, count: int, seed: int, tokenizer):
    """(the document's text, [(question text, its Sample)] * count): a document-first
    multi-key needle sample whose question is asked once per key (each Sample's answer: that
    key's code, for eval.tasks.score)."""
    import dataclasses

    from kvrecall.eval.tasks import KEY_WORDS, document_first, niah_multikey

    if not 1 <= count <= len(KEY_WORDS):
        raise SystemExit(f"--questions must be in [1, {len(KEY_WORDS)}] (one secret word each)")
    sample = document_first(niah_multikey(context_tokens, seed=seed, tokenizer=tokenizer, num_keys=count))
    document, question = sample.prompt[: sample.question_at], sample.prompt[sample.question_at :]
    keys, codes = sample.meta["keys"], sample.meta["codes"]
    return document, [
        (question.replace(keys[0], key), dataclasses.replace(sample, answer=code, answers=(code,)))
        for key, code in zip(keys, codes, strict=True)
    ]


def run_questions(args: argparse.Namespace) -> int:
    """`kvrecall demo --questions N`: N sessions over one shared document."""
    from kvrecall.client import KVRecallClient
    from kvrecall.client.hf import model_fingerprint
    from kvrecall.eval.tasks import score
    from kvrecall.local import LocalDaemon
    from kvrecall.models.smollm import load_model
    from kvrecall.prefix import declare
    from kvrecall.tasktype import with_task
    from kvrecall.worker import decode, open_model_session

    torch.manual_seed(args.seed)
    quiet = args.json

    def say(message: str) -> None:
        print(message, file=sys.stderr if quiet else sys.stdout, flush=True)

    say("loading SmolLM2-135M-Instruct (bundled GGUF, offline) ...")
    model, tokenizer = load_model()
    document, questions = questions_about_one_document(args.context_tokens, args.questions, args.seed, tokenizer)
    doc_ids = tokenizer(document, return_tensors="pt").input_ids
    asked = [tokenizer(q, return_tensors="pt", add_special_tokens=False).input_ids for q, _ in questions]
    max_tokens = doc_ids.shape[1] + max(q.shape[1] for q in asked) + args.max_new_tokens + 16  # one layout for all
    declaration = declare(doc_ids[0].tolist(), model_fingerprint(model))
    config = with_task(args.policy, policy_config(args.policy, args.budget, args.policy_config), document)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    eos.discard(None)
    rows = []
    with contextlib.ExitStack() as stack:
        target = args.target or stack.enter_context(LocalDaemon()).target
        client = stack.enter_context(KVRecallClient(target, "demo-worker"))
        for i, ((_, sample), question) in enumerate(zip(questions, asked, strict=True)):
            session, cache = open_model_session(client, model, args.policy, config, max_tokens, tag=f"demo-q{i}", prefix=declaration)
            with session:
                result = decode(model, cache, torch.cat((doc_ids, question), dim=1), args.max_new_tokens, eos)
                own = session.stats().host_bytes
                prefix = next((p for p in client.stats().prefixes if p.prefix_id == session.info.prefix_id), None)
                held = session.prefix_held
            answer = tokenizer.decode(result.tokens, skip_special_tokens=True).strip()
            rows.append({
                "answer": answer, "expected": sample.answer, "correct": bool(score(sample, answer) >= 1.0),
                "prefix_tokens_held": held, "ingest_seconds": round(result.prefill_seconds, 3),
                # the first session's bytes include the document's pages it registered
                "host_bytes": own + (prefix.host_bytes if prefix is not None and not held else 0),
            })  # fmt: skip
            say(f"question {i + 1}/{len(asked)}: {answer!r} (expected {sample.answer}); prefill+ingest "
                f"{result.prefill_seconds:.2f} s, {'document held' if held else 'document ingested'}")
    rest = rows[1:]
    report = {
        "policy": args.policy,
        "document_tokens": int(doc_ids.shape[1]),
        "questions": [{k: r[k] for k in ("answer", "expected", "correct")} for r in rows],
        "first_ingest_seconds": rows[0]["ingest_seconds"],
        "rest_ingest_seconds_mean": round(sum(r["ingest_seconds"] for r in rest) / len(rest), 3) if rest else None,
        "host_bytes_first": rows[0]["host_bytes"],
        "host_bytes_rest_mean": round(sum(r["host_bytes"] for r in rest) / len(rest)) if rest else None,
        "rest_held_the_document": all(r["prefix_tokens_held"] == doc_ids.shape[1] for r in rest),
        "seed": args.seed,
    }
    if args.json:
        print(json.dumps(report))
    else:
        correct = sum(r["correct"] for r in rows)
        print(f"\n{len(rows)} questions about one {report['document_tokens']}-token document: {correct} correct")
        print(f"first session: prefill+ingest {report['first_ingest_seconds']} s, {report['host_bytes_first']} host bytes")
        if rest:
            print(f"the rest (mean): prefill+ingest {report['rest_ingest_seconds_mean']} s, "
                  f"{report['host_bytes_rest_mean']} host bytes")
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """`kvrecall worker`: run `--sessions` decode sessions of the bundled model against a daemon
    (one after another, seeds 0..N-1), print one JSON line per session, exit 0 when all ran."""
    import os

    from kvrecall.client import KVRecallClient
    from kvrecall.eval.tasks import demo_sample, score
    from kvrecall.models.smollm import load_model
    from kvrecall.tasktype import with_task
    from kvrecall.worker import decode, open_model_session

    device = args.device or os.environ.get("KVRECALL_DEVICE", "cpu")
    model, tokenizer = load_model(device=device)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    eos.discard(None)
    with KVRecallClient(args.target, args.worker_id, token=args.token) as client:
        for seed in range(args.sessions):
            sample = demo_sample(args.context_tokens, seed=seed, tokenizer=tokenizer)
            input_ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(device)
            max_tokens = input_ids.shape[1] + args.max_new_tokens + 16
            config = with_task(args.policy, policy_config(args.policy, args.budget, args.policy_config), sample.prompt)
            session, cache = open_model_session(
                client, model, args.policy, config, max_tokens, tag=args.worker_id
            )
            with session:
                result = decode(model, cache, input_ids, args.max_new_tokens, eos)
            answer = tokenizer.decode(result.tokens, skip_special_tokens=True).strip()
            print(json.dumps({
                "worker": args.worker_id, "seed": seed, "policy": args.policy,
                "prompt_tokens": int(input_ids.shape[1]), "generated_tokens": len(result.tokens),
                "correct": bool(score(sample, answer) >= 1.0), "retrievals": result.boundaries,
                "gpu_resident_tokens": result.max_resident,
            }), flush=True)
    return 0
