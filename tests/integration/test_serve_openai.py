"""`kvrecall worker --serve` answers the official `openai` client: a real worker server process
(the bundled SmolLM2 on CPU, batched decode) decoding through the real test daemon.

One server per module (loading the model takes ~20 s); tiny prompts, a few tokens each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from kvrecall.client import KVRecallClient

pytestmark = pytest.mark.model

WORKER_ID = "serve-test"
MODEL = "SmolLM2-135M-Instruct"
WINDOW = 256  # --max-model-len: a prompt past it is cheap to build
SLOTS, QUEUE = 4, 2  # --max-batch, --max-queue
PROMPT = "The capital of France is"
LONG_PROMPT = "Count from one to one hundred: one, two, three, four,"  # no early EOS
CHAT = [{"role": "user", "content": "Name a colour."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    """The worker server's output."""
    return tmp_path_factory.mktemp("serve") / "worker.log"


@pytest.fixture(scope="module")
def server(daemon, log_path):
    port = free_port()
    argv = [
        sys.executable, "-m", "kvrecall.cli", "worker", "--serve", "--target", daemon.target,
        "--worker-id", WORKER_ID, "--port", str(port), "--host", "127.0.0.1",
        "--max-model-len", str(WINDOW), "--policy", "louiskv", "--budget", "16",
        "--max-batch", str(SLOTS), "--max-queue", str(QUEUE),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert process.poll() is None, (
                f"worker exited {process.returncode}: {log_path.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"worker not ready: {log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_and_health(server, api):
    (card,) = api.models.list().data
    assert card.id == MODEL
    with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
        body = json.loads(response.read())
    assert body == {"status": "ok", "daemon": "SERVING", "worker": WORKER_ID, "model": MODEL,
                    "slots": SLOTS, "running": 0, "waiting": 0}  # fmt: skip


def test_completion_with_two_policies_matches_full_kv(api):
    """A prompt shorter than the budget: louiskv and quest keep all of it, so their greedy
    answers equal full attention's; each response names the policy it decoded with."""
    answers = {}
    for policy in ("full", "louiskv", "quest"):
        response = api.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"kvrecall": {"policy": policy}}
        )
        (choice,) = response.choices
        assert response.usage.prompt_tokens > 0 and 1 <= response.usage.completion_tokens <= 4
        assert choice.finish_reason in ("length", "stop")
        extra = response.model_extra["kvrecall"]
        assert (extra["policy"], extra["worker"]) == (policy, WORKER_ID)
        answers[policy] = choice.text
    assert answers["full"].strip(), answers
    assert answers["louiskv"] == answers["quest"] == answers["full"], answers


def test_request_budget_reaches_the_daemon(api):
    """Budgets within the session (prompt + max_tokens + a margin) reach the daemon as given;
    a larger one covers the sequence and is capped to it."""
    response = api.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"kvrecall": {"policy": "quest", "budget": 8}}
    )
    assert response.model_extra["kvrecall"]["policy_config"]["budget"] == 8
    default = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert default.model_extra["kvrecall"]["policy"] == "louiskv"
    assert default.model_extra["kvrecall"]["policy_config"]["budget"] == 16  # the server's --budget
    large = api.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"kvrecall": {"budget": 100_000}}
    )
    session_tokens = large.usage.prompt_tokens + 2 + 16
    assert large.model_extra["kvrecall"]["policy_config"]["budget"] == session_tokens


def test_streamed_completion_equals_the_whole_one(api):
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_streamed_and_not(api):
    whole = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    stream = api.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_cuts_the_answer(api):
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    text = whole.choices[0].text
    stop = text.strip()[:2]
    cut = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


BAD_REQUESTS = {
    "unknown policy": ({"kvrecall": {"policy": "nope"}}, "kvrecall.policy"),
    "budget 0": ({"kvrecall": {"budget": 0}}, "kvrecall.budget"),
    "budget on a policy without one": ({"kvrecall": {"policy": "full", "budget": 8}}, "kvrecall.budget"),
    "unknown kvrecall field": ({"kvrecall": {"budgett": 8}}, "kvrecall.budgett"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "prompt past the window": ({"prompt": "word " * (WINDOW + 8)}, "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_a_400_naming_the_field_and_the_worker_keeps_serving(server, api, case):
    change, param = BAD_REQUESTS[case]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **change}
    status, answer = post_raw(f"{server}/v1/completions", json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param, answer
    assert param in answer["error"]["message"]
    assert api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).choices[0].text


def test_malformed_json_and_chat_past_the_window(server, api):
    status, answer = post_raw(f"{server}/v1/chat/completions", b'{"model": "x", "messages": [')
    assert (status, answer["error"]["param"]) == (400, "body"), answer
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * WINDOW}])
    assert caught.value.body["param"] == "messages" and caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="another-model", prompt=PROMPT, max_tokens=1)
    assert api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1).choices[0].message.content


def test_every_request_closes_its_session(daemon, api):
    api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    with KVRecallClient(daemon.target, "serve-test-probe") as probe:
        open_sessions = [s for s in probe.stats().sessions if s.worker_id == WORKER_ID]
    assert open_sessions == []


def test_a_client_that_leaves_stops_its_decoding(server, api, log_path):
    """A long non-streamed request whose client gives up after a second: the worker stops
    decoding it (it logs the session as cancelled, far short of max_tokens) and serves on."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": WINDOW - 16}).encode()
    request = urllib.request.Request(
        f"{server}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(OSError):  # the client's own timeout
        urllib.request.urlopen(request, timeout=1)
    assert api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).choices[0].text
    lines = [line for line in log_path.read_text().splitlines() if "(cancelled)" in line]
    assert lines, "the abandoned request was decoded to the end"
    generated = int(lines[-1].split(" + ")[1].split(" tokens")[0])
    assert generated < WINDOW - 16, lines[-1]


def health(server: str) -> dict:
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        return json.loads(response.read())


def wait_for_load(server: str, running: int, waiting: int) -> None:
    deadline = time.monotonic() + 120
    while (load := health(server))["running"] != running or load["waiting"] != waiting:
        assert time.monotonic() < deadline, f"never reached running={running} waiting={waiting}: {load}"
        time.sleep(0.2)


# Covering budgets (past the session, capped to it): every policy decodes what full KV does.
CONCURRENT = [("full", None), ("louiskv", 512), ("quest", 512), ("windowkv", 512)]


def test_concurrent_requests_of_four_policies_share_steps_and_answer_as_alone(api):
    """Four requests, one per policy, two streamed and two not, sent at once while a long
    streamed request decodes: they share decode steps (each reports a batch of >= 2), and
    each answers what it answers alone, which is full KV's answer."""

    def ask(i: int) -> tuple[str, dict]:
        policy, budget = CONCURRENT[i]
        options = {"kvrecall": {"policy": policy, **({"budget": budget} if budget else {})}}
        if i % 2:
            chunks = list(api.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=6, stream=True, extra_body=options
            ))  # fmt: skip
            return "".join(c.choices[0].text for c in chunks), chunks[-1].model_extra["kvrecall"]
        whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, extra_body=options)
        return whole.choices[0].text, whole.model_extra["kvrecall"]

    alone = [ask(i) for i in range(len(CONCURRENT))]
    anchor = api.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=WINDOW - 32, stream=True)
    try:
        next(iter(anchor))  # it decodes: the four join its batch
        with ThreadPoolExecutor(len(CONCURRENT)) as pool:
            together = list(pool.map(ask, range(len(CONCURRENT))))
    finally:
        anchor.close()
    full_text = alone[0][0]
    assert full_text.strip()
    for (policy, _), (text, report), (alone_text, alone_report) in zip(CONCURRENT, together, alone, strict=True):
        assert (text, alone_text) == (full_text, full_text), policy
        assert report["policy"] == policy
        assert report["max_batch"] >= 2 and alone_report["max_batch"] == 1, (policy, report, alone_report)


def test_a_full_worker_answers_503_and_recovers(server, api):
    """Every slot busy and the queue full: the next request is a 503 with an OpenAI-style
    error; once the clients leave, slots and queue empty and the worker serves again."""
    body = json.dumps({"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": WINDOW - 32}).encode()
    port = int(server.rsplit(":", 1)[1])
    wait_for_load(server, 0, 0)  # the earlier tests' requests are gone
    held = []
    try:
        for _ in range(SLOTS + QUEUE):  # requests whose clients wait without reading
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            held.append(connection)
        wait_for_load(server, SLOTS, QUEUE)
        status, answer = post_raw(f"{server}/v1/completions", json.dumps({"prompt": PROMPT}).encode())
        assert status == 503, answer
        assert (answer["error"]["type"], answer["error"]["code"]) == ("server_error", "overloaded")
    finally:
        for connection in held:
            connection.close()
    wait_for_load(server, 0, 0)
    assert api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).choices[0].text
