"""The OpenAI-compatible HTTP API over an `Engine`, on FastAPI (served by uvicorn).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`
(the model's chat template), both with `"stream": true` (server-sent events ending in `[DONE]`).
depthkit's loop controls travel in the request body, where the OpenAI client's `extra_body` puts
them: `loops` (recursion depth R), `exit_threshold` (early exit; `null` turns it off) and `exit_rule`
(`kl` or `hidden`, see `depthkit.recursive.generate`).
Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status that fits (400 bad request, 404 unknown model), and never stops the engine serving others.
A streaming client that disconnects cancels its sequence, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import PreTrainedTokenizerBase

from depthkit.errors import DepthkitError
from depthkit.recursive.generate import DEFAULT_EXIT_RULE
from depthkit.serve.engine import ContextLengthError, Engine, Event, GenerationParams, Sequence
from depthkit.serve.text import TextStream

DEFAULT_MAX_TOKENS = 16
DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    """An error answered to the client (OpenAI's error object) instead of a traceback."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class ServedModel:
    """What the API serves: the engine, its tokenizer, the name clients use, and its loop limits."""

    engine: Engine
    tokenizer: PreTrainedTokenizerBase
    name: str
    default_exit_threshold: float | None = None
    default_exit_rule: str = DEFAULT_EXIT_RULE


def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI application; the engine runs in a background thread for the app's lifetime, and
    its events reach the requests through one `Mailbox` (one wake-up of the loop per burst)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="depthkit serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return ApiError(500, f"{type(err).__name__}: {err}").response()

    @app.get("/health")
    async def health() -> dict:
        engine = served.engine
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models() -> dict:
        config = served.engine.model.config
        return {"object": "list", "data": [{
            "id": served.name, "object": "model", "created": 0, "owned_by": "depthkit",
            "loops": config.num_loops, "max_loops": served.engine.max_loops,
            "context_length": served.engine.capacity}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request_body(request, served)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, str):
            ids = served.tokenizer(prompt).input_ids
        else:
            raise ApiError(400, "`prompt` must be a string or a list of token ids (one prompt per request)",
                           "prompt")
        return await respond(request, served, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request_body(request, served)
        return await respond(request, served, body, chat_prompt(served.tokenizer, body.get("messages")), chat=True)

    return app


async def request_body(request: Request, served: ServedModel) -> dict[str, Any]:
    """The JSON body, refused with a 400 when it is not an object and a 404 for another model's name."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served.name:
        raise ApiError(404, f"the model `{model}` does not exist; this server serves `{served.name}`", "model",
                       "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    return body


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Any) -> list[int]:
    """Token ids of the conversation in the model's chat template, ready for the assistant's turn."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "every message needs a `role` and a `content`", "messages")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: only text is served here
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise ApiError(400, "message `content` must be a string or a list of text parts", "messages")
        turns.append({"role": message["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def generation_params(body: dict[str, Any], served: ServedModel) -> GenerationParams:
    """OpenAI's sampling fields (and depthkit's loop fields), type-checked."""
    threshold = served.default_exit_threshold
    if "exit_threshold" in body:  # an explicit null turns the server's default off
        threshold = None if body["exit_threshold"] is None else _number(body["exit_threshold"], "exit_threshold", float)
    return GenerationParams(
        max_tokens=_number(body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS)),
                           "max_tokens", int),
        temperature=_number(body.get("temperature", 1.0), "temperature", float),
        top_p=_number(body.get("top_p", 1.0), "top_p", float),
        seed=None if body.get("seed") is None else _number(body["seed"], "seed", int),
        loops=None if body.get("loops") is None else _number(body["loops"], "loops", int),
        exit_threshold=threshold, exit_rule=str(body.get("exit_rule") or served.default_exit_rule))


def _number(value: Any, name: str, kind: type) -> int | float:
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value != value or value in (float("inf"), float("-inf")):
        raise ApiError(400, f"`{name}` must be a finite {'integer' if kind is int else 'number'}, got {value!r}", name)
    return kind(value)


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "`stop` must be a string or a list of at most 4 strings", "stop")
    return stop


async def respond(request: Request, served: ServedModel, body: dict[str, Any], prompt: list[int], chat: bool):
    params = generation_params(body, served)
    stream, usage_chunk = TextStream(served.tokenizer, stop_strings(body)), include_usage(body)
    sequence = Sequence(prompt, params)
    events = submit(served.engine, sequence, request.app.state.mailbox)
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": served.name}
    if body.get("stream"):
        return StreamingResponse(sse(request, sequence, events, stream, meta, chat, usage_chunk),
                                 media_type="text/event-stream")
    pieces = [item async for item in texts(request, sequence, events, stream)]
    text, reason = "".join(piece for piece, _ in pieces), pieces[-1][1] if pieces else None
    if reason == "error":
        raise ApiError(500, "generation failed", code="engine_error")
    return completion_object(meta, sequence, text, reason, chat)


class Mailbox:
    """Carries the engine thread's events to the event loop's queues in bursts: one wake-up of the
    loop for all the tokens an engine iteration emits, rather than one per token (each wake-up is a
    write to the loop's self-pipe and a turn of the loop, on the cores the engine computes on)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Event]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        """From the engine thread: deliver `event` to `queue` with the next burst."""
        with self._lock:
            self._items.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, event in items:
            queue.put_nowait(event)


def submit(engine: Engine, sequence: Sequence, mailbox: Mailbox) -> asyncio.Queue:
    """Queue the sequence; its events arrive on the returned asyncio queue (the engine is another thread)."""
    queue: asyncio.Queue = asyncio.Queue()
    sequence.emit = lambda event: mailbox.post(queue, event)
    try:
        engine.submit(sequence)
    except DepthkitError as err:
        raise ApiError(400, str(err), code="context_length_exceeded" if isinstance(err, ContextLengthError)
                       else None) from err
    return queue


async def watch_disconnect(request: Request, sequence: Sequence) -> None:
    """Cancel the sequence when its client leaves (polled: the engine then ends it, which ends its stream)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    sequence.cancel()


async def texts(request: Request, sequence: Sequence, events: asyncio.Queue, stream: TextStream
                ) -> AsyncIterator[tuple[str, str | None]]:
    """(new text, finish reason or None) as tokens arrive; cancels the sequence if the client leaves
    or the generator is closed early."""
    watcher = asyncio.create_task(watch_disconnect(request, sequence))
    try:
        while True:
            event: Event = await events.get()
            if event.token is not None:
                piece = stream.push(event.token)
                if stream.stopped:
                    sequence.cancel("stop")
                    yield piece, "stop"
                    return
                if piece:
                    yield piece, None
            if event.finish_reason is not None:
                yield stream.finish(), event.finish_reason
                return
    finally:
        watcher.cancel()
        if sequence.finish_reason is None and sequence.cancelled is None:
            sequence.cancel()


async def sse(request: Request, sequence: Sequence, events: asyncio.Queue, stream: TextStream, meta: dict,
              chat: bool, usage_chunk: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, then (`usage_chunk`) OpenAI's usage-only chunk, then
    `data: [DONE]`. The last content chunk carries the usage too, for clients that do not ask."""
    if chat:
        yield _event(chunk_object(meta, {"role": "assistant", "content": ""}, None, chat))
    async for piece, reason in texts(request, sequence, events, stream):
        if piece or reason:
            delta = {"content": piece} if chat else piece
            yield _event(chunk_object(meta, delta, reason, chat, sequence if reason else None))
    if usage_chunk:
        kind = "chat.completion.chunk" if chat else "text_completion"
        yield _event(meta | {"object": kind, "choices": [], "usage": usage(sequence)})
    yield "data: [DONE]\n\n"


def include_usage(body: dict[str, Any]) -> bool:
    """OpenAI's `stream_options: {"include_usage": true}`, type-checked."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "`stream_options` must be an object with a boolean `include_usage`", "stream_options")
    return options.get("include_usage", False)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def usage(sequence: Sequence) -> dict[str, Any]:
    steps = sequence.steps_used or [sequence.loops]
    return {"prompt_tokens": len(sequence.prompt), "completion_tokens": len(sequence.tokens),
            "total_tokens": len(sequence.prompt) + len(sequence.tokens),
            "loops": sequence.loops, "mean_loops_per_token": sum(steps) / len(steps)}


def completion_object(meta: dict, sequence: Sequence, text: str, reason: str | None, chat: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice |= {"text": text, "logprobs": None}
    return meta | {"object": "chat.completion" if chat else "text_completion", "choices": [choice],
                   "usage": usage(sequence)}


def chunk_object(meta: dict, delta: Any, reason: str | None, chat: bool, sequence: Sequence | None = None) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    choice |= {"delta": delta} if chat else {"text": delta, "logprobs": None}
    chunk = meta | {"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
    if sequence is not None:
        chunk["usage"] = usage(sequence)
    return chunk
