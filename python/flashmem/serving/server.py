"""The OpenAI-compatible HTTP server: POST /v1/completions and /v1/chat/completions (whole or
streamed as server-sent events), GET /v1/models, /v1/models/{id} and /health (JSON: status,
pending = requests waiting or running, max_batch, max_queue, max_context, and finished = how
many requests ended, by finish_reason: stop, length, cancelled, error).

Threads: uvicorn's event loop reads requests and writes responses. ONE engine thread (Engine)
calls BatchRunner.step() while there is work, and sleeps on a condition when there is none; a
step admits waiting requests into free KV-cache slots and decodes one token for every active
request, so a new request joins the batch at the next step. The engine thread hands each text
piece to its request's asyncio queue with loop.call_soon_threadsafe. A client that goes away
has its request cancelled (its slot is freed at the next step). SIGINT or SIGTERM cancels
what is in flight, stops the engine thread and returns from serve() (`flashmem serve` exits 0).

Where this differs from OpenAI's API:
- one prompt and one choice per request: n (and best_of) must be 1; a list of several prompts
  is rejected with 400 (send them as separate requests: they are batched together anyway);
- frequency_penalty and presence_penalty must be 0 (400 otherwise): use repetition_penalty;
- no logprobs, echo, suffix, logit_bias, tools or non-text content (400 when asked for);
- extensions: top_k, min_p, repetition_penalty (HF semantics, as Model.generate) and
  ignore_eos (generate until max_tokens or the end of the context);
- defaults as OpenAI's: temperature 1, top_p 1; max_tokens 16 for completions, and for chat
  until the end of the context (max_context); generation that reaches the end of the context
  ends with finish_reason "length" (a max_tokens beyond it is not an error);
- a request naming another model than the served one gets 404 (model may be left out);
- unknown fields are rejected with 400, as OpenAI does (a few that only matter to OpenAI's own
  service, such as user, store, metadata and service_tier, are accepted and ignored);
- 503 with code "queue_full" when --max-queue requests are waiting or running;
- a stream's response starts with its first token, so a failure before it (a prompt longer than
  max_context) gets its HTTP status; a failure after it, or a shutdown, ends the stream with
  an error event (data: {"error": {...}}, which OpenAI's client raises) instead of [DONE].
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the optional extra is not installed
    raise ImportError(f'the flashmem server needs Starlette and uvicorn ({e}): pip install "flashmem[server]"') from e

log = logging.getLogger("flashmem.serving")

MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413) before it is parsed
STOP_TIMEOUT_S = 5.0  # how long shutdown waits for the engine thread (it ends within a step)

# fields that only matter to OpenAI's own service: accepted and ignored
IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                  "safety_identifier"}
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "frequency_penalty", "presence_penalty", "stop", "seed", "n", "stream", "stream_options",
                   "logprobs", "logit_bias", "ignore_eos"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "best_of", "echo", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "functions", "function_call", "response_format", "modalities"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# --- errors -------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.code == "queue_full" else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# --- reading a request body -----------------------------------------------------------------------
class Body:
    """A request's JSON object, read one field at a time; a wrong value raises a 400 that names
    the field. null counts as absent, as with OpenAI."""

    def __init__(self, data, known: set[str]):
        if not isinstance(data, dict):
            raise bad(f"the request body must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - known - IGNORED_FIELDS)
        if unknown:
            raise bad(f"unrecognized request argument supplied: {unknown[0]}", unknown[0])
        self.data = data

    def integer(self, name: str, default: int | None, lo: int | None = None) -> int | None:
        v = self.data.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(f"{name} must be an integer, got {json.dumps(v)}", name)
        if lo is not None and v < lo:
            raise bad(f"{name} must be >= {lo}, got {v}", name)
        return v

    def number(self, name: str, default: float | None, ok, rule: str) -> float | None:
        """A finite number for which ok(v) holds; rule says which ("in [0, 2]")."""
        v = self.data.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(f"{name} must be a number, got {json.dumps(v)}", name)
        if not ok(v):
            raise bad(f"{name} must be {rule}, got {v}", name)
        return float(v)

    def boolean(self, name: str, default: bool) -> bool:
        v = self.data.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad(f"{name} must be true or false, got {json.dumps(v)}", name)
        return v

    def string(self, name: str) -> str | None:
        v = self.data.get(name)
        if v is not None and not isinstance(v, str):
            raise bad(f"{name} must be a string, got {json.dumps(v)}", name)
        return v

    def unsupported(self, name: str, allowed, why: str) -> None:
        """A field this server does not implement: only its neutral values are accepted."""
        v = self.data.get(name)
        if v is not None and not any(v == a and type(v) is type(a) for a in allowed):
            raise bad(f"{name}={json.dumps(v)} is not supported: {why}", name)


@dataclass
class Job:
    """A parsed request: what BatchRunner.submit gets, and how to answer."""
    model: str | None  # the model the client named, if it did
    prompt: object  # text, token ids or chat messages
    params: dict  # BatchRunner.submit's keyword arguments
    stream: bool
    include_usage: bool


def _sampling(b: Body, max_tokens: int | None) -> tuple[dict, bool, bool]:
    """The fields both endpoints share -> (submit's keyword arguments, stream, include_usage)."""
    if b.integer("n", 1) != 1:
        raise bad("n must be 1: this server returns one choice per request", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if b.number(name, 0.0, lambda v: True, "") != 0.0:
            raise bad(f"{name} is not supported (only 0); use repetition_penalty (> 1 penalizes tokens already "
                      f"in the prompt or output, as HF transformers does)", name)
    b.unsupported("logit_bias", [{}], "logit_bias is not implemented")
    stop = b.data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise bad(f"stop must be a non-empty string or a list of non-empty strings, got {json.dumps(stop)}", "stop")
    seed = b.integer("seed", None, lo=0)
    if seed is not None and seed >= 1 << 64:
        raise bad(f"seed must be < 2**64, got {seed}", "seed")
    stream = b.boolean("stream", False)
    options = b.data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad(f"stream_options must be an object with include_usage, got {json.dumps(options)}",
                      "stream_options")
        include_usage = Body(options, {"include_usage", "continuous_usage_stats"}).boolean("include_usage", False)
    params = dict(
        max_new_tokens=max_tokens,
        temperature=b.number("temperature", 1.0, lambda v: 0 <= v <= 2, "in [0, 2] (0 = greedy)"),
        top_p=b.number("top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=b.integer("top_k", 0, lo=0),
        min_p=b.number("min_p", 0.0, lambda v: 0 <= v < 1, "in [0, 1)"),
        repetition_penalty=b.number("repetition_penalty", 1.0, lambda v: v > 0, "> 0 (1 = off)"),
        seed=seed,
        stop=stop or None,
    )
    if b.boolean("ignore_eos", False):
        params["eos_token_id"] = []  # no end-of-sequence token ends the generation
    return params, stream, include_usage


def _token_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def parse_completion(data) -> Job:
    b = Body(data, COMPLETION_FIELDS)
    prompt = b.data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _token_ids(prompt[0])):
        prompt = prompt[0]  # a batch of one prompt
    if not (isinstance(prompt, str) or _token_ids(prompt)):
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise bad(f"a request may hold one prompt, got {len(prompt)}: send one request per prompt "
                      "(concurrent requests are batched together)", "prompt")
        what = "missing" if prompt is None else json.dumps(prompt)[:80]
        raise bad(f"prompt must be a string or a list of token ids, got {what}", "prompt")
    b.unsupported("best_of", [1], "this server returns one choice per request")
    b.unsupported("echo", [False], "echo is not implemented")
    b.unsupported("suffix", [""], "suffix (insertion) is not implemented")
    b.unsupported("logprobs", [], "logprobs are not implemented")
    params, stream, usage = _sampling(b, b.integer("max_tokens", 16, lo=1))
    return Job(b.string("model"), prompt, params, stream, usage)


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                          f"supported, got {kind!r}", f"{where}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad(f"{where}.content must be a string or a list of text parts, got {json.dumps(content)[:80]}",
              f"{where}.content")


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        what = "missing" if messages is None else json.dumps(messages)[:80]
        raise bad(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, got {what}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content, got {json.dumps(m)[:80]}", where)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)}", f"{where}.role")
        # what clients send back of an earlier answer (refusal, tool_calls, ... null or empty) is fine
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v not in (None, [], ""))
        if extra:
            raise bad(f"{where}.{extra[0]} is not supported (no tool or function calls)", f"{where}.{extra[0]}")
        out.append({"role": CHAT_ROLES[role], "content": _content(m.get("content"), where)})
    return out


def parse_chat(data, max_context: int) -> Job:
    b = Body(data, CHAT_FIELDS)
    messages = parse_messages(b.data.get("messages"))
    b.unsupported("logprobs", [False], "logprobs are not implemented")
    b.unsupported("top_logprobs", [0], "logprobs are not implemented")
    for name in ("tools", "functions"):
        b.unsupported(name, [[]], "tool and function calls are not implemented")
    b.unsupported("tool_choice", ["none", "auto"], "tool calls are not implemented")
    b.unsupported("function_call", ["none", "auto"], "function calls are not implemented")
    b.unsupported("response_format", [{"type": "text"}], "only plain text responses are implemented")
    b.unsupported("modalities", [["text"]], "only text output is implemented")
    old = b.integer("max_tokens", None, lo=1)
    max_tokens = b.integer("max_completion_tokens", old, lo=1)  # OpenAI's newer name wins
    params, stream, usage = _sampling(b, max_tokens or max_context)  # default: until the end of the context
    return Job(b.string("model"), messages, params, stream, usage)


# --- the engine thread ----------------------------------------------------------------------------
@dataclass
class Sink:
    """Where one request's events go: an asyncio queue of (piece, done, error) on the server's loop."""
    req: object
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class Engine:
    """Owns a BatchRunner: submit() and cancel() from any thread; one thread of its own runs
    step() while requests are waiting or active, and sleeps on a condition when none are."""

    def __init__(self, runner, max_queue: int):
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.runner, self.max_queue = runner, max_queue
        self._submitting = threading.Lock()  # one submit at a time, so that the queue limit holds
        self._cv = threading.Condition()  # guards what follows; the engine thread sleeps on it
        self._sinks: dict[object, Sink] = {}  # request id -> sink, until its done event is handed over
        self._early: dict[object, list] = {}  # events of a request submitted but not registered yet
        self._thread = threading.Thread(target=self._run, name="flashmem-engine", daemon=True)
        self.stopping = False
        self.failure: BaseException | None = None  # what step() raised, if it did: the engine is unusable
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}  # requests done, by finish_reason

    def start(self) -> None:
        if not self._thread.is_alive() and not self.stopping:
            self._thread.start()

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        """Queues a request; its events go to `queue` on `loop`. Call it off the event loop:
        BatchRunner.submit tokenizes the prompt (the engine thread goes on meanwhile)."""
        with self._submitting:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.failure is not None:
                raise ApiError(503, f"the engine failed and cannot serve: {self.failure!r}", code="engine_failed")
            pending = self.runner.pending()
            if pending >= self.max_queue:
                raise ApiError(503, f"the server is busy: {pending} requests are waiting or running, the most it "
                                    f"takes (--max-queue {self.max_queue}); retry later", code="queue_full")
            try:
                req = self.runner.submit(job.prompt, **job.params)
            except (ValueError, TypeError) as e:
                raise bad(str(e)) from e
            with self._cv:
                self._sinks[req.id] = Sink(req, loop, queue)
                for event in self._early.pop(req.id, ()):  # what a step made of it before we got here
                    self._hand_over(req.id, *event)
                if self.stopping:  # stop() ran meanwhile and did not see it
                    self.runner.cancel(req)
                self._cv.notify()
        return req

    def cancel(self, req) -> None:
        """Ends a request early (its slot is freed at the next step); a no-op when it is done."""
        if req.finish_reason is None:
            self.runner.cancel(req)

    def stop(self) -> None:
        """Refuses new requests and cancels those in flight; the engine thread ends once the
        runner has freed their slots."""
        with self._cv:
            self.stopping = True
            reqs = [s.req for s in self._sinks.values()]
            self._cv.notify()
        for req in reqs:
            self.cancel(req)

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def pending(self) -> int:
        return self.runner.pending()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self.runner.pending() == 0 and not self.stopping:
                    self._cv.wait()
                if self.runner.pending() == 0:  # stopping, and nothing is left to end
                    return
            try:
                events = self.runner.step()
            except BaseException as e:  # the runner itself broke (a request's own failure is req.error)
                log.exception("flashmem engine: step() failed; the server stops serving")
                self._fail(e)
                return
            with self._cv:
                for req, piece, done in events:
                    if req.id in self._sinks:
                        self._hand_over(req.id, piece, done)
                    else:  # submitted, not registered yet
                        self._early.setdefault(req.id, []).append((piece, done))

    def _hand_over(self, rid, piece: str, done: bool, error: BaseException | None = None) -> None:
        sink = self._sinks.pop(rid) if done else self._sinks[rid]
        if done:
            reason = "error" if error is not None else sink.req.finish_reason
            self.finished[reason] = self.finished.get(reason, 0) + 1
        try:
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, (piece, done, error))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            self.failure = e
            for rid in list(self._sinks):
                self._hand_over(rid, "", True, e)


# --- answers --------------------------------------------------------------------------------------
class Answer:
    """Formats one request's answer as OpenAI does, for /v1/completions (chat=False) or
    /v1/chat/completions (chat=True), whole or as stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, piece: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}


def usage(req) -> dict:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
            "total_tokens": req.prompt_tokens + req.completion_tokens}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def failure(req, error: BaseException | None, engine: Engine) -> ApiError | None:
    """Why a request that is done did not finish normally, as an ApiError; None when it did."""
    error = error or getattr(req, "error", None)
    if error is not None:
        if isinstance(error, ValueError):  # what the request asked for cannot be done (a prompt too long...)
            return bad(str(error))
        return ApiError(500, f"generation failed: {error!r}")
    if req.finish_reason == "cancelled":
        if engine.stopping:
            return ApiError(503, "the server is shutting down; the request was cancelled", code="shutting_down")
        return ApiError(503, "the request was cancelled", code="cancelled")
    return None


# --- the app --------------------------------------------------------------------------------------
class Api:
    def __init__(self, engine: Engine, model_name: str, max_context: int, max_batch: int):
        self.engine, self.model_name, self.max_context, self.max_batch = engine, model_name, max_context, max_batch
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        e = self.engine
        status = "failed" if e.failure is not None else "stopping" if e.stopping else "ok"
        body = {"status": status, "model": self.model_name, "pending": e.pending(), "max_batch": self.max_batch,
                "max_queue": e.max_queue, "max_context": self.max_context, "finished": dict(e.finished)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "flashmem",
                "max_model_len": self.max_context}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _read_json(self, request: Request):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        if not body.strip():
            raise bad("the request body is empty: send a JSON object")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise bad(f"the request body is not valid JSON: {e}") from None

    async def _generate(self, request: Request, chat: bool) -> Response:
        data = await self._read_json(request)
        job = parse_chat(data, self.max_context) if chat else parse_completion(data)
        if job.model is not None and job.model != self.model_name:
            raise ApiError(404, f"the model {job.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        queue: asyncio.Queue = asyncio.Queue()
        req = await run_in_threadpool(self.engine.submit, job, asyncio.get_running_loop(), queue)
        answer = Answer(chat, self.model_name)
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, req))
        try:
            first = await queue.get()  # a failure before the first token gets its own HTTP status
            piece, done, error = first
            if done and (err := failure(req, error, self.engine)) is not None:
                raise err
            if not job.stream:
                pieces = [piece]
                while not done:
                    piece, done, error = await queue.get()
                    pieces.append(piece)
                if (err := failure(req, error, self.engine)) is not None:
                    raise err
                return JSONResponse(answer.whole("".join(pieces), req.finish_reason, usage(req)))
        except BaseException:
            self.engine.cancel(req)
            raise
        finally:
            watcher.cancel()  # a stream has the response's own disconnect listener from here on
        return StreamingResponse(self._stream(req, queue, first, answer, job.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(self, req, queue: asyncio.Queue, first, answer: Answer, include_usage: bool):
        try:
            if answer.chat:
                yield sse(answer.chunk(first=True))
            piece, done, error = first
            while True:
                if piece:
                    yield sse(answer.chunk(piece))
                if done:
                    break
                piece, done, error = await queue.get()
            err = failure(req, error, self.engine)
            if err is not None:  # the stream ends with OpenAI's error object (the client raises it)
                yield sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                return
            yield sse(answer.chunk(finish_reason=req.finish_reason))
            if include_usage:
                yield sse(answer.usage_chunk(usage(req)))
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away and the response was cancelled
            self.engine.cancel(req)

    async def _cancel_on_disconnect(self, request: Request, req) -> None:
        """Until the answer starts: a client that goes away has its request cancelled."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(req)


async def _api_error(request: Request, e: ApiError) -> Response:
    return e.response()


async def _http_error(request: Request, e: HTTPException) -> Response:
    if e.status_code == 404:
        message = f"no route {request.method} {request.url.path}; this server has /v1/completions, " \
                  "/v1/chat/completions, /v1/models and /health"
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = e.detail
    return ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()


async def _internal_error(request: Request, e: Exception) -> Response:
    log.exception("flashmem server: %s %s failed", request.method, request.url.path)
    return ApiError(500, f"internal error: {e!r}").response()


def create_app(runner, model_name: str, max_queue: int = 64, max_context: int | None = None) -> Starlette:
    """The ASGI app over a BatchRunner. Its engine thread starts and stops with the app's
    lifespan; app.state.engine is the Engine."""
    model = getattr(runner, "model", None)
    if max_context is None:
        max_context = getattr(model, "max_context", None)
    engine = Engine(runner, max_queue)
    api = Api(engine, model_name, max_context, runner.max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            await run_in_threadpool(engine.join, STOP_TIMEOUT_S)

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.engine = engine
    return app


# --- serve() --------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn's server, which prints where it listens once it does, and on SIGINT/SIGTERM
    cancels the requests in flight at once (uvicorn would wait for them to finish)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, model_name: str):
        super().__init__(config)
        self.engine, self.model_name = engine, model_name

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"flashmem serving {self.model_name} on http://{host}:{port}", flush=True)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        # in a thread of its own: a signal handler must not wait for locks the interrupted code may hold
        threading.Thread(target=self.engine.stop, name="flashmem-stop", daemon=True).start()


def model_name_of(path: str | None) -> str:
    """The served model's id: the file or folder name, without .gguf."""
    if path is None:
        from ..checkpoints.default_model import GGUF_NAME

        path = GGUF_NAME
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    return name[:-5] if name.lower().endswith(".gguf") else name


def serve(model_path: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_queue: int = 64, model_name: str | None = None, log_level: str = "info", **load_kwargs) -> None:
    """Loads a model (flashmem.load(model_path, max_batch=max_batch, **load_kwargs)) and serves
    it until SIGINT or SIGTERM. port=0 picks a free port (the printed line says which).
    model_name: the id clients use (default: the model's file or folder name)."""
    import flashmem
    from ..batching import BatchRunner

    if not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
    model = flashmem.load(model_path, max_batch=max_batch, **load_kwargs)
    runner = BatchRunner(model)
    name = model_name or model_name_of(model_path)
    app = create_app(runner, name, max_queue=max_queue, max_context=model.max_context)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(STOP_TIMEOUT_S))
    server = _Server(config, app.state.engine, name)
    # uvicorn raises the signal that stopped it again once it is done, to end the process the
    # signal's default way; a stop asked for by a signal is a normal end here (exit status 0)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        app.state.engine.stop()
        if not app.state.engine.join(STOP_TIMEOUT_S):
            print("flashmem serve: the engine thread did not stop in time", file=sys.stderr)
