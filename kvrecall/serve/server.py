"""`kvrecall worker --serve`: load a model and serve it over HTTP (OpenAI-compatible) with uvicorn,
decoding every request through the daemon at `--target`: in batched steps shared by up to
`--max-batch` requests (serve/batched.py), or one at a time for models the batched engine
cannot run (serve/serial.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

log = logging.getLogger("kvrecall.serve")


def worker_id(args: argparse.Namespace) -> str:
    """--worker-id, else $KVRECALL_WORKER_ID, else the host name: every container of a scaled
    service has its own, so each gets its own quota and stats on the daemon."""
    return args.worker_id or os.environ.get("KVRECALL_WORKER_ID") or socket.gethostname()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _on_off(flag: bool | None) -> str:
    return "-" if flag is None else ("on" if flag else "off")


def make_engine(loaded, client, device: str, args: argparse.Namespace, window: int):
    """The batched engine where it runs the model, else the serial one (and the log says why)."""
    from kvrecall.serve.batched import BatchedEngine, unbatchable
    from kvrecall.serve.serial import SerialEngine

    reason = unbatchable(loaded.model)
    if reason is None:
        from kvrecall.engine.engine import EMBEDDED_SWITCH_INTERVAL_S, SWITCH_INTERVAL_S

        embedded = getattr(args, "embedded", False)  # the daemon on a thread of this process: its lock too
        return BatchedEngine(loaded, client, args.max_batch, args.max_queue, window, lag=args.lag,
                             overlap=args.overlap == "on", switch=args.switch,
                             switch_interval=EMBEDDED_SWITCH_INTERVAL_S if embedded else SWITCH_INTERVAL_S)
    log.warning("%s: no batched decode (%s); requests decode one at a time", loaded.name, reason)
    return SerialEngine(loaded, client, device, args.max_queue)


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from kvrecall.client import KVRecallClient
    from kvrecall.models.pretrained import load
    from kvrecall.serve.app import ServeSettings, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for this handler:
    # leave through the `finally`s below (engine, client) and exit 0, as a stopped container should.
    signal.signal(signal.SIGTERM, _stop)
    device = args.device or os.environ.get("KVRECALL_DEVICE", "cpu")
    identity = worker_id(args)
    loaded = load(args.model, device=device)
    window = min(args.max_model_len or loaded.max_positions, loaded.max_positions)
    settings = ServeSettings(
        worker_id=identity, policy=args.policy, budget=args.budget, max_model_len=window,
        default_max_tokens=args.max_new_tokens,
    )  # fmt: skip
    with KVRecallClient(args.target, identity, token=args.token) as client:
        engine = make_engine(loaded, client, device, args, window)
        if getattr(args, "gc_freeze", "on") == "on":
            from kvrecall import gcfreeze

            log.info("gc freeze: %d objects of startup frozen (kvrecall/gcfreeze.py)", gcfreeze.freeze())
        log.info(
            "worker %s serves %s (%d-token window, default policy %s budget %s, %d decode slots, lag %s, overlap %s, "
            "queue %d) on http://%s:%d, daemon %s", identity, loaded.name, window, args.policy, args.budget,
            engine.slots, getattr(engine, "lag", "-"), _on_off(getattr(engine, "overlap", None)), args.max_queue,
            args.host, args.port, args.target,
        )  # fmt: skip
        try:
            uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="warning")
        finally:
            engine.close()
            log.info("worker %s stopped", identity)
    return 0
