"""The HTTP side of a serving worker: OpenAI-compatible routes over a decode engine.

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events)
    GET  /v1/models, GET /health                       (health: 200 while the daemon serves,
                                                        with the engine's slots and queue)

Every refused request gets an OpenAI-style error body naming the field at fault; nothing a
request sends can stop the worker from serving the next one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from kvrecall.client import (
    InvalidArgumentError,
    KVRecallClientError,
    ResourceExhaustedError,
    UnavailableError,
)
from kvrecall.demo import POLICY_BUDGET_FIELD, budget_config
from kvrecall.serve.generation import DecodeEngine, Generation, GenerationRequest
from kvrecall.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    chunk_body,
    completion_body,
    error_body,
    new_id,
    usage,
)
from kvrecall.serve.text import TextStream

log = logging.getLogger("kvrecall.serve")

# pydantic's names for union members in an error's location; not request fields.
_TYPE_TAGS = frozenset({"str", "int", "list[int]", "list[str]", "bool", "dict"})


@dataclass(frozen=True)
class ServeSettings:
    worker_id: str
    policy: str  # the default policy of requests that name none
    budget: int | None  # the default budget (for policies that take one)
    max_model_len: int  # prompt + completion tokens a request may use
    default_max_tokens: int  # chat requests without max_tokens: at most this many


def create_app(engine: DecodeEngine, settings: ServeSettings) -> FastAPI:
    loaded = engine.loaded
    tokenizer = loaded.tokenizer
    app = FastAPI(title="kvrecall worker", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        log.info("refused (%d): %s [%s]", exc.status, exc.message, exc.param)
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return JSONResponse(error_body(exc.message, exc.param, exc.code, kind), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            message, param = f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", "body"
        else:
            parts = [str(p) for p in first.get("loc", ())[1:] if str(p) not in _TYPE_TAGS]
            param = ".".join(parts) or "body"
            message = f"{param}: {first['msg']}"
        return JSONResponse(error_body(message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), None), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            status = await asyncio.to_thread(engine.client.health, 2.0)
        except KVRecallClientError as exc:
            status = f"unreachable ({exc})"
        body = {"status": "ok" if status == "SERVING" else "unavailable", "daemon": status,
                "worker": settings.worker_id, "model": loaded.name, **engine.load()}  # fmt: skip
        return JSONResponse(body, status_code=200 if status == "SERVING" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": loaded.name, "object": "model", "created": created, "owned_by": "kvrecall",
                "max_model_len": settings.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer(body.prompt).input_ids
        else:
            prompt_ids = list(body.prompt)
            if any(not 0 <= t < len(tokenizer) for t in prompt_ids):
                raise RequestError(f"prompt: token ids must be in [0, {len(tokenizer)})", "prompt")
        return await respond(http, body, prompt_ids, "prompt", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        messages = [m.model_dump() for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template refuses this conversation
            raise RequestError(
                f"messages: the model's chat template refused them: {exc}", "messages"
            ) from None
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        return await respond(http, body, prompt_ids, "messages", chat=True)

    def generation_request(body, prompt_ids: list[int], prompt_field: str, chat: bool) -> GenerationRequest:
        window = settings.max_model_len
        limit = body.token_limit() if chat else body.max_tokens
        if limit is None:
            limit = max(1, min(settings.default_max_tokens, window - len(prompt_ids)))
        if len(prompt_ids) + limit > window:
            raise RequestError(
                f"this model's maximum context length is {window} tokens; the request asks for "
                f"{len(prompt_ids) + limit} ({len(prompt_ids)} in the {prompt_field}, {limit} to generate)",
                prompt_field, code="context_length_exceeded",
            )  # fmt: skip
        policy = body.kvrecall.policy or settings.policy
        budget = body.kvrecall.budget
        if budget is None and policy in POLICY_BUDGET_FIELD:
            budget = settings.budget
        try:
            config = budget_config(policy, budget)
        except ValueError as exc:
            raise RequestError(f"kvrecall.budget: {exc}", "kvrecall.budget") from None
        return GenerationRequest(prompt_ids=prompt_ids, max_tokens=limit, policy=policy, policy_config=config)

    async def respond(http: Request, body, prompt_ids: list[int], prompt_field: str, chat: bool):
        """Answer one request; a client that leaves stops its decoding (queued: before it starts)."""
        if body.model is not None and body.model != loaded.name:
            raise RequestError(
                f"model {body.model!r} is not served here (this worker serves {loaded.name!r})",
                "model", status=404, code="model_not_found",
            )  # fmt: skip
        request = generation_request(body, prompt_ids, prompt_field, chat)
        watcher = asyncio.create_task(cancel_on_disconnect(http, asyncio.current_task()))
        try:
            generation = await start(request)
            stream = TextStream(tokenizer, body.stop_strings())
            request_id = new_id("chatcmpl" if chat else "cmpl")
            if body.stream:
                watcher.cancel()  # from here StreamingResponse watches the connection
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                events = sse(request_id, request, generation, stream, chat, include_usage)
                return StreamingResponse(events, media_type="text/event-stream")
            try:
                async for token in generation:
                    stream.push(token)
                    if stream.stopped:
                        generation.cancel()
            except Exception as exc:  # noqa: BLE001 - the engine logged it; the client gets a 5xx
                raise decoding_failed(exc) from None
            finally:
                generation.cancel()
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # not the client leaving: the server is stopping
            asyncio.current_task().uncancel()
            return Response(status_code=499)  # nobody reads it: the client is gone
        finally:
            watcher.cancel()
        extra = {"usage": usage(len(prompt_ids), len(stream.tokens)), "kvrecall": report(request, generation)}
        return completion_body(
            request_id, loaded.name, stream.text, finish_reason(generation, stream), extra, chat
        )

    async def cancel_on_disconnect(http: Request, handler: asyncio.Task) -> None:
        """Cancel `handler` (a non-streamed request's) when its client disconnects: the body is
        read, so the next ASGI message is the disconnect."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        handler.cancel()

    async def start(request: GenerationRequest) -> Generation:
        try:
            return await engine.start(request)
        except InvalidArgumentError as exc:
            field = exc.details.split(":", 1)[0]
            param = "kvrecall.policy" if field == "policy.name" else "kvrecall"
            raise RequestError(f"{param}: {exc.details}", param) from None
        except ResourceExhaustedError as exc:
            raise RequestError(f"the KV daemon is out of memory for this request: {exc.details}", None,
                               status=429, code="resource_exhausted") from None  # fmt: skip
        except UnavailableError as exc:
            raise RequestError(f"the KV daemon is unavailable: {exc.details}", None, status=503) from None

    async def sse(
        request_id: str, request: GenerationRequest, generation: Generation, stream: TextStream,
        chat: bool, include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                yield event(chunk_body(request_id, loaded.name, None, None, chat))
            async for token in generation:
                delta = stream.push(token)
                if delta:
                    yield event(chunk_body(request_id, loaded.name, delta, None, chat))
                if stream.stopped:
                    generation.cancel()
            rest = stream.finish()
            extra = {"kvrecall": report(request, generation)}
            yield event(
                chunk_body(request_id, loaded.name, rest, finish_reason(generation, stream), chat, extra)
            )
            if include_usage:
                final = chunk_body(request_id, loaded.name, "", None, chat)
                final["choices"] = []
                final["usage"] = usage(len(request.prompt_ids), len(stream.tokens))
                yield event(final)
        except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            yield event(error_body(decoding_failed(exc).message, None, kind="server_error"))
        finally:
            generation.cancel()
        yield "data: [DONE]\n\n"

    def decoding_failed(exc: Exception) -> RequestError:
        status = 503 if isinstance(exc, KVRecallClientError) else 500
        return RequestError(f"decoding failed: {exc}", None, status=status)

    def finish_reason(generation: Generation, stream: TextStream) -> str:
        return "stop" if stream.stopped else generation.finish_reason

    def report(request: GenerationRequest, generation: Generation) -> dict[str, Any]:
        stats = generation.stats
        return {"worker": settings.worker_id, "policy": request.policy, "policy_config": stats.policy_config,
                "session_id": stats.session_id, "retrievals": stats.retrievals, "appends": stats.appends,
                "max_batch": stats.max_batch}  # fmt: skip

    return app
