"""Checks a running compose CPU stack from the outside (called by scripts/test-deploy.sh).

1. completions through the load balancer with the `openai` client, two policies, reach both workers;
2. a ~2,000-token prompt through the balancer: louiskv at budget 256 answers as full KV does;
3. Prometheus has scraped kvrecall_* series from the daemon;
4. a worker killed mid-request: the balancer answers from the other one, and the daemon
   reclaims the dead worker's session.

Prints one line per check and exits non-zero at the first failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import openai

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def docker(*argv: str) -> str:
    return subprocess.run(["docker", *argv], check=True, capture_output=True, text=True).stdout.strip()


def workers(project: str) -> list[tuple[str, str]]:
    """(container id, host name = worker id) of the running worker replicas."""
    ids = docker(
        "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
        "--filter", "label=com.docker.compose.service=worker",
    ).split()  # fmt: skip
    return [(cid, docker("inspect", "-f", "{{.Config.Hostname}}", cid)) for cid in ids]


def daemon_sessions(project: str) -> list[dict]:
    """The daemon's open sessions (kvrecall stats --json inside its container)."""
    (daemon,) = docker(
        "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
        "--filter", "label=com.docker.compose.service=kvrecall",
    ).split()  # fmt: skip
    stats = docker(
        "exec", daemon, "kvrecall", "stats", "--json", "--target", "unix:///run/kvrecall/kvrecall.sock"
    )
    return json.loads(stats).get("sessions", [])


def check_completions(api: openai.OpenAI, expected_workers: set[str]) -> None:
    seen: dict[str, set[str]] = {}
    for policy in ("louiskv", "quest"):
        for _ in range(2):
            started = time.perf_counter()
            response = api.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=4,
                extra_body={"kvrecall": {"policy": policy, "budget": 64}},
            )
            extra = response.model_extra["kvrecall"]
            assert extra["policy"] == policy, extra
            seen.setdefault(policy, set()).add(extra["worker"])
            say(f"  {policy}: {response.choices[0].text!r} from {extra['worker']} "
                f"in {time.perf_counter() - started:.2f} s")  # fmt: skip
    answered = set().union(*seen.values())
    assert answered == expected_workers, f"answered by {answered}, workers are {expected_workers}"
    say(f"OK completions through the load balancer: both policies, both workers {sorted(answered)}")


def check_long_prompt(api: openai.OpenAI) -> None:
    from kvrecall.eval.tasks import demo_sample
    from kvrecall.models.smollm import load_tokenizer

    tokenizer = load_tokenizer()
    sample = demo_sample(2000, seed=0, tokenizer=tokenizer)
    answers = {}
    for policy, options in (("full", {"policy": "full"}), ("louiskv", {"policy": "louiskv", "budget": 256})):
        started = time.perf_counter()
        response = api.completions.create(model=MODEL, prompt=sample.prompt, max_tokens=8,
                                          extra_body={"kvrecall": options})  # fmt: skip
        answers[policy] = response.choices[0].text
        say(f"  {policy}: {response.usage.prompt_tokens} prompt tokens -> {answers[policy]!r} "
            f"in {time.perf_counter() - started:.1f} s (expected code {sample.answer})")  # fmt: skip
    assert answers["louiskv"] == answers["full"], answers
    say("OK a ~2,000-token prompt: louiskv at budget 256 answers exactly as full KV")


def check_prometheus(url: str, timeout: float) -> None:
    query = urllib.parse.urlencode({"query": 'count({__name__=~"kvrecall_.+", job="kvrecall", stack="cpu"})'})
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as response:
            result = json.loads(response.read())["data"]["result"]
        series = int(float(result[0]["value"][1])) if result else 0
        if series > 0:
            say(f"OK Prometheus holds {series} kvrecall_* series scraped from the daemon")
            return
        assert time.monotonic() < deadline, "Prometheus has no kvrecall_* series"
        time.sleep(3)


def stream_until_first_token(url: str, opened: threading.Event) -> None:
    """A long streamed completion; sets `opened` at its first token, then reads until cut off."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 512, "stream": True}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    opened.set()
    except OSError:
        pass  # the worker was killed under it


def check_worker_loss(api: openai.OpenAI, project: str, lease_timeout: float) -> None:
    (victim, victim_id), (_, survivor_id) = workers(project)[:2]
    port = docker("port", victim, "8000").splitlines()[0]
    opened = threading.Event()
    threading.Thread(target=stream_until_first_token, args=(f"http://{port}", opened), daemon=True).start()
    assert opened.wait(120), "the long request never started"
    held = [s for s in daemon_sessions(project) if s.get("worker_id") == victim_id]
    assert held, f"the daemon shows no session of {victim_id} mid-request"
    docker("kill", victim)
    killed_at = time.monotonic()
    say(f"killed worker {victim_id} mid-request (it held session {held[0]['session_id']})")
    for _ in range(4):
        response = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert response.model_extra["kvrecall"]["worker"] == survivor_id, response.model_extra
    say(f"OK the load balancer answered 4 requests from {survivor_id} "
        f"{time.monotonic() - killed_at:.1f} s after the kill")  # fmt: skip
    while [s for s in daemon_sessions(project) if s.get("worker_id") == victim_id]:
        assert time.monotonic() - killed_at < lease_timeout, f"{victim_id}'s session still open"
        time.sleep(1)
    say(
        f"OK the daemon reclaimed the dead worker's session {time.monotonic() - killed_at:.1f} s after the kill"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lb", default="http://127.0.0.1:8000")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--project", default="kvrecall")
    parser.add_argument("--lease-timeout", type=float, default=90.0, help="seconds for the daemon to reclaim")
    args = parser.parse_args()
    api = openai.OpenAI(base_url=f"{args.lb}/v1", api_key="unused", max_retries=0, timeout=300)
    check_completions(api, {worker_id for _, worker_id in workers(args.project)})
    check_long_prompt(api)
    check_prometheus(args.prometheus, timeout=90)
    check_worker_loss(api, args.project, args.lease_timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
