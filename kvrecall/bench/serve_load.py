"""Load on an OpenAI-compatible endpoint (a serving worker, or the compose load balancer).

    python -m kvrecall.bench.serve_load --url http://127.0.0.1:8000 --clients 1,4,16

For each concurrency level, that many clients send `--requests` completions between them,
back to back (each client waits for its answer before its next), after one untimed warm-up
request per client. Prints requests/s, generated tokens/s and p50/p99 latency per level, and writes the
table and the run's settings as JSON (`--out`), with the host's load average around each level
(on a shared machine, the other work's share of the CPU). Plain HTTP from threads: no client
library. Several comma-separated `--url`s take the requests in turn (round robin, as a load
balancer would).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import platform
import statistics
import time
import urllib.request
from pathlib import Path


def complete(url: str, body: bytes) -> tuple[float, int, str]:
    """(seconds, completion tokens, worker id) of one completion."""
    request = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer["usage"]["completion_tokens"], answer["kvrecall"]["worker"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(urls: list[str], body: bytes, clients: int, requests: int) -> dict:
    per_client = max(1, requests // clients)
    turn = itertools.count()  # next() is atomic: the clients' threads share it

    def send() -> tuple[float, int, str]:
        return complete(urls[next(turn) % len(urls)], body)

    def client(_: int) -> list[tuple[float, int, str]]:
        return [send() for _ in range(per_client)]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: send(), range(clients)))  # warm-up: not counted
        load_before = os.getloadavg()
        started = time.perf_counter()
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
        wall = time.perf_counter() - started
        load_after = os.getloadavg()
    latencies = [seconds for seconds, _, _ in results]
    tokens = sum(n for _, n, _ in results)
    workers: dict[str, int] = {}
    for _, _, worker in results:
        workers[worker] = workers.get(worker, 0) + 1
    return {
        "clients": clients,
        "requests": len(results),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "latency_max_s": round(max(latencies), 3),
        "requests_per_worker": workers,
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in load_after]},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="one or more, comma separated")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma separated")
    parser.add_argument("--requests", type=int, default=16, help="timed requests per level (>= clients)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=48, help="a prompt of about this many words")
    parser.add_argument("--policy", default="louiskv")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--note", default="", help="where and how it ran (stored in the JSON)")
    parser.add_argument("--out", default=f"bench/results/serve-load-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args(argv)
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * max(1, args.prompt_words // 9))
    body = json.dumps({
        "prompt": prompt + " Summarise:", "max_tokens": args.max_tokens,
        "kvrecall": {"policy": args.policy, "budget": args.budget},
    }).encode()  # fmt: skip
    urls = args.url.split(",")
    levels = [run_level(urls, body, int(c), args.requests) for c in args.clients.split(",")]
    print(f"\n{args.url}: {args.max_tokens} tokens per request, ~{args.prompt_words}-word prompt, "
          f"{args.policy} budget {args.budget}")  # fmt: skip
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'load':>5}  per worker")
    for level in levels:
        print(f"{level['clients']:>7} {level['requests']:>8} {level['requests_per_s']:>7.2f} "
              f"{level['tokens_per_s']:>7.1f} {level['latency_p50_s']:>7.2f} {level['latency_p99_s']:>7.2f} "
              f"{level['load_average_1_5_15min']['after'][0]:>5.1f}  {level['requests_per_worker']}")  # fmt: skip
    report = {
        "url": args.url, "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
        "policy": args.policy, "budget": args.budget, "requests": args.requests,
        "host": platform.node(), "cpus": os.cpu_count(), "note": args.note, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "levels": levels,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
