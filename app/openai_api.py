"""An OpenAI-compatible HTTP API over the running system (``omnistream serve-api``, ``up --api``).

    POST /v1/chat/completions   the last user message is asked about the session's stream; the
                                answer comes whole ("chat.completion") or, with "stream": true,
                                as "chat.completion.chunk" server-sent events ending "data: [DONE]"
    GET  /v1/models             "omnistream" and the running system's LLM (either id is accepted)
    GET  /v1/events             server-sent events of a session: watch alerts, transcripts, ...

It is a client of the gateway like any other (one ``AsyncClient`` per session named): a question
becomes an ``Ask``, its ``AnswerDelta``s the chunks, its ``AnswerDone`` the end, and a client that
hangs up mid-answer sends an ``Interrupt``. The session is the ``X-Omnistream-Session`` header,
else the request's ``user`` field, else the configured one. The answer ends with the stream
times it was given from ("Sources: [00:12-00:20] [00:41]", from ``AnswerDone.context``; request
field ``"citations": false`` leaves them out); ``"stream_time": 41.0`` asks at that stream time
(default: now). Sampling fields (temperature, max_tokens, ...) are accepted and ignored: the
system's configuration decides. Usage counts the answer's tokens (its deltas); the prompt is
assembled inside reasoning and not counted (0).

Security: loopback by default; any other host needs a bearer token (from a file or
``$OMNISTREAM_API_TOKEN``, never the command line), and with a token every endpoint answers
401 without ``Authorization: Bearer <token>``. Errors have OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnistream.app.async_client import AsyncClient
from omnistream.app.client_core import LOST_AFTER_S, AnswerTurn, ClientError
from omnistream.protocol.config import Config
from omnistream.protocol.messages import Alert, AnswerDone, Message, Sighting, Transcript
from omnistream.protocol.security import is_loopback
from omnistream.protocol.text import clock

log = logging.getLogger("omnistream.api")

TOKEN_ENV = "OMNISTREAM_API_TOKEN"
SESSION_HEADER = "x-omnistream-session"
BASE_MODEL = "omnistream"
MAX_BODY_BYTES = 256 << 10
MAX_QUESTION_CHARS = 2000  # the gateway's limit on Ask.question
MAX_SESSIONS = 32  # connections kept (one per session named); the least recently used idle one goes
MAX_CITATIONS = 8
KEEPALIVE_S = 15.0
SESSION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@-]{0,127}")
EVENT_TYPES: dict[str, type[Message]] = {
    "alert": Alert,
    "transcript": Transcript,
    "sighting": Sighting,
    "answer": AnswerDone,
}
DEFAULT_EVENTS = ("alert", "transcript")


class ApiSecurityError(ValueError):
    """The API would be served beyond loopback without a token, or the token is unusable."""


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# -- security ----------------------------------------------------------------------------------------


def read_token(token_file: str | Path | None = None) -> str | None:
    """The bearer token: the first line of ``token_file`` (readable by its owner only), else
    ``$OMNISTREAM_API_TOKEN``, else None. Raises ``ApiSecurityError`` for an unusable one."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ApiSecurityError(f"cannot read the API token file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ApiSecurityError(
                f"the API token file {path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 {path}"
            )
        token = text.strip()
        source = str(path)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ApiSecurityError(f"the API token in {source} must be one word of at least 16 characters")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if not token and not is_loopback(host):
        raise ApiSecurityError(
            f"--host {host} serves the API beyond this machine: give it a token "
            f"(--token-file FILE or ${TOKEN_ENV}); clients send it as 'Authorization: Bearer TOKEN'"
        )


def api_endpoint(
    config: Config, host: str | None = None, port: int | None = None, token_file: str | None = None
) -> tuple[str, int, str | None]:
    """Where to serve and with which token: the arguments, else ``config.api``; raises
    ``ApiSecurityError`` for a host beyond loopback without a token, or an unusable token."""
    host = host or config.api.host
    token = read_token(token_file or config.api.token_file or None)
    check_bind(host, token)
    return host, config.api.port if port is None else port, token


def authorised(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


# -- requests ----------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    question: str
    session: str
    model: str
    stream: bool = False
    citations: bool = True
    include_usage: bool = False
    stream_time: float = 0.0


def check_session(name: str, param: str) -> str:
    if not SESSION_NAME.fullmatch(name):
        raise ApiError(
            400,
            f"{param} {name[:64]!r} is not a session name: 1-128 letters, digits and . _ : @ - "
            "(not starting with . or -)",
            code="invalid_session",
            param=param,
        )
    return name


def message_text(content: Any, index: int) -> str:
    """A message's text: a string, or the "text" parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(
                    400,
                    f"messages[{index}].content has a {kind!r} part: only text is supported "
                    "(the system watches its own video and audio)",
                    code="unsupported_content",
                    param=f"messages[{index}].content",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(
        400,
        f"messages[{index}].content must be a string or a list of text parts",
        param=f"messages[{index}].content",
    )


def parse_chat(body: Any, session_header: str | None, default_session: str, models: list[str]) -> ChatRequest:
    """A chat completion request checked: the question (the last user message), the session, the
    model and the options; ``ApiError`` (400, or 404 for an unknown model) names what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", BASE_MODEL)
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    if model not in models:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this system serves: {', '.join(models)}",
            code="model_not_found",
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of messages", param="messages")
    question = None
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(
                400, f"messages[{index}] must be an object with a role", param=f"messages[{index}]"
            )
        if message["role"] == "user":
            question = message_text(message.get("content"), index).strip()
            if not question:
                raise ApiError(400, f"messages[{index}].content is empty", param=f"messages[{index}].content")
            if len(question) > MAX_QUESTION_CHARS:
                raise ApiError(
                    400,
                    f"messages[{index}].content has {len(question)} characters; at most {MAX_QUESTION_CHARS}",
                    param=f"messages[{index}].content",
                )
            break
    if question is None:
        raise ApiError(400, "messages has no user message: the question is the last one", param="messages")
    flags = {}
    for name in ("stream", "citations"):
        value = body.get(name, name == "citations")
        if not isinstance(value, bool):
            raise ApiError(400, f"{name} must be true or false", param=name)
        flags[name] = value
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: the system gives one answer", param="n")
    stream_time = body.get("stream_time", 0.0)
    if isinstance(stream_time, bool) or not isinstance(stream_time, int | float) or not stream_time >= 0:
        raise ApiError(400, "stream_time must be a number of seconds >= 0 (0: now)", param="stream_time")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    if session_header is not None:
        session = check_session(session_header, "the X-Omnistream-Session header")
    elif body.get("user") is not None:
        if not isinstance(body["user"], str):
            raise ApiError(400, "user must be a string (the session name)", param="user")
        session = check_session(body["user"], "user")
    else:
        session = default_session
    return ChatRequest(
        question=question,
        session=session,
        model=model,
        stream=flags["stream"],
        citations=flags["citations"],
        include_usage=bool(options.get("include_usage")),
        stream_time=float(stream_time),
    )


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON, at most ``limit`` bytes of it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(
            400, f"the request body has {declared} bytes; at most {limit}", code="request_too_large"
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(400, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


# -- answers -----------------------------------------------------------------------------------------


def citations(context: list[list[float]], limit: int = MAX_CITATIONS) -> str:
    """The stream-time spans an answer was given from, as it cites them: "[00:12-00:20] [00:41]"
    (the newest ``limit`` spans; an earlier one "...")."""
    spans = []
    for span in context:
        start, end = clock(span[0]), clock(span[-1])
        spans.append(f"[{start}]" if start == end else f"[{start}-{end}]")
    spans = list(dict.fromkeys(spans))
    return " ".join((["..."] if len(spans) > limit else []) + spans[-limit:])


def sources_line(done: AnswerDone | None) -> str:
    cited = citations(done.context) if done is not None else ""
    return f"\n\nSources: {cited}" if cited else ""


def client_failure(exc: ClientError) -> ApiError:
    """The HTTP error for a gateway's refusal or a failed answer."""
    text = str(exc)
    if exc.code in ("busy", "too_many_sessions", "rate_limited"):
        return ApiError(429, text, kind="rate_limit_error", code=exc.code)
    if exc.code == "invalid":
        return ApiError(400, text, code="invalid")
    if "unreachable" in text or "no reply from the gateway" in text:
        return ApiError(
            503, f"the omnistream system does not answer: {text}", kind="server_error", code="unavailable"
        )
    if text.startswith("no complete answer"):
        return ApiError(504, text, kind="server_error", code="timeout")
    return ApiError(502, text, kind="server_error", code=exc.code or "answer_failed")


class Turn:
    """One question asked through ``client``: its deltas as they stream, its ``AnswerDone``."""

    def __init__(self, client: AsyncClient, question: str, stream_time: float, timeout_s: float):
        self.client = client
        self.question = question
        self.stream_time = stream_time
        self.timeout_s = timeout_s
        self.turn = ""
        self.done: AnswerDone | None = None
        self.deltas = 0
        self.started = time.monotonic()
        self.first_delta_s: float | None = None
        # Listening before asking (the first delta may come at once); the queue is the client's
        # fan-out of its event stream, as ``AsyncClient.ask`` uses it.
        self.queue = client._listen()

    async def ask(self) -> None:
        """Send the question; ``ClientError`` when the gateway refuses it."""
        try:
            self.turn = await self.client.send_ask(self.question, self.stream_time, speak=False)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.client._listeners.discard(self.queue)

    async def interrupt(self) -> None:
        """Stop answering (the asker hung up); never waits more than a few seconds."""
        if self.turn and self.done is None:
            with anyio.move_on_after(5, shield=True):
                try:
                    await self.client.interrupt(self.turn)
                    log.info("interrupted", extra={"turn": self.turn, "session": self.client.session})
                except ClientError:
                    pass

    async def events(self, idle_s: float = 1.0) -> AsyncIterator[str | None]:
        """The answer's text deltas; None after ``idle_s`` without one (a chance to keep the
        connection alive or notice a hang-up). Ends at the ``AnswerDone`` (``self.done``);
        raises ``ClientError`` for a failed or overdue answer."""
        answer = AnswerTurn(self.client, self.turn, self.timeout_s, LOST_AFTER_S)
        heard = time.monotonic()  # when this turn last yielded (other events do not count)
        try:
            while True:
                answer.check_lost()
                if answer.remaining() <= 0:
                    raise answer.too_late()
                if time.monotonic() - heard >= idle_s:
                    heard = time.monotonic()
                    yield None
                try:
                    event = await asyncio.wait_for(self.queue.get(), min(idle_s, answer.remaining()))
                except TimeoutError:
                    continue
                if isinstance(event, AnswerDone) and event.turn == self.turn:
                    self.done = event
                text = answer.take(event)
                if answer.finished:
                    return
                if text is not None:
                    if self.first_delta_s is None:
                        self.first_delta_s = time.monotonic() - self.started
                    self.deltas += 1
                    heard = time.monotonic()
                    yield text
        finally:
            self.close()

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": 0, "completion_tokens": self.deltas, "total_tokens": self.deltas}

    def extra(self, session: str) -> dict[str, Any]:
        done = self.done
        return {
            "session": session,
            "turn": self.turn,
            "context": done.context if done else [],
            "first_token_s": round(done.first_token_s, 3) if done else None,
            "total_s": round(done.total_s, 3) if done else None,
            # from the request to the first delta here (the API's own latency included)
            "api_first_token_s": None if self.first_delta_s is None else round(self.first_delta_s, 3),
        }


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class BearerAuth:
    """Every request needs ``Authorization: Bearer <token>`` (a plain ASGI middleware: it leaves
    streamed responses and hang-up detection alone)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization")
            if not authorised(header.decode("latin-1") if header is not None else None, self.token):
                error = ApiError(
                    401,
                    "invalid API token"
                    if header is not None
                    else "missing 'Authorization: Bearer TOKEN' header",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the app -----------------------------------------------------------------------------------------


Connect = Callable[[str], Awaitable[AsyncClient]]


@dataclass
class Connections:
    """One ``AsyncClient`` per session named (the gateway keeps state per session and limits the
    sessions one connection may name), the least recently used idle one closed beyond ``limit``."""

    connect: Connect
    limit: int = MAX_SESSIONS
    clients: OrderedDict[str, AsyncClient] = field(default_factory=OrderedDict)
    in_use: dict[str, int] = field(default_factory=dict)
    lock: asyncio.Lock | None = None

    async def get(self, session: str) -> AsyncClient:
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            client = self.clients.get(session)
            if client is None:
                idle = [name for name in self.clients if not self.in_use.get(name)]
                if len(self.clients) >= self.limit and not idle:
                    raise ApiError(
                        429,
                        f"{len(self.clients)} sessions are answering at once; at most {self.limit}",
                        kind="rate_limit_error",
                        code="too_many_sessions",
                    )
                if len(self.clients) >= self.limit:
                    await self.clients.pop(idle[0]).close()
                try:
                    client = await self.connect(session)
                except (ClientError, FileNotFoundError, ValueError) as exc:
                    raise ApiError(
                        503,
                        f"the omnistream system does not answer: {exc}",
                        kind="server_error",
                        code="unavailable",
                    ) from None
                self.clients[session] = client
            self.clients.move_to_end(session)
            return client

    @asynccontextmanager
    async def use(self, session: str) -> AsyncIterator[AsyncClient]:
        client = await self.get(session)
        self.in_use[session] = self.in_use.get(session, 0) + 1
        try:
            yield client
        finally:
            self.in_use[session] -= 1

    async def close(self) -> None:
        while self.clients:
            _, client = self.clients.popitem()
            await client.close()


def model_ids(llm: str) -> list[str]:
    """The ids /v1/models lists: "omnistream" and the LLM's name (a local model directory's name)."""
    name = Path(llm).name if llm and ("/" in llm or os.sep in llm) else llm
    return [BASE_MODEL] + ([name] if name and name != BASE_MODEL else [])


def create_app(
    run_dir: Path | None = None,
    *,
    token: str | None = None,
    session: str = "default",
    llm: str = "",
    endpoint: str | None = None,
    keys_dir: Path | None = None,
    key_name: str = "client",
    timeout_s: float = 30.0,
    answer_timeout_s: float = 300.0,
) -> FastAPI:
    """The API for the system in ``run_dir`` (or the gateway at ``endpoint``). ``llm`` names its
    model (default: the one in the run directory's config)."""
    if not llm and run_dir is not None and (Path(run_dir) / "config.json").exists():
        from omnistream.protocol.config import read_config

        llm = read_config(Path(run_dir) / "config.json").reasoning.model
    models = model_ids(llm)
    created = int(time.time())
    check_session(session, "the default session")

    async def connect(name: str) -> AsyncClient:
        return await AsyncClient.connect(
            run_dir,
            session=name,
            timeout_s=timeout_s,
            endpoint=endpoint,
            keys_dir=keys_dir,
            key_name=key_name,
        )

    connections = Connections(connect)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await connections.close()

    app = FastAPI(title="omnistream", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.connections = connections
    app.state.models = models

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind=kind).response()

    if token is not None:
        app.add_middleware(BearerAuth, token=token)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": created, "owned_by": "omnistream"} for m in models
            ],
        }

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        if model not in models:
            raise ApiError(
                404, f"the model {model!r} does not exist", kind="not_found_error", code="model_not_found"
            )
        return {"id": model, "object": "model", "created": created, "owned_by": "omnistream"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_chat(await read_body(request), request.headers.get(SESSION_HEADER), session, models)
        async with connections.use(chat.session) as client:
            turn = Turn(client, chat.question, chat.stream_time, answer_timeout_s)
            try:
                await turn.ask()
            except ClientError as exc:
                raise client_failure(exc) from None
        base = {
            "id": f"chatcmpl-{turn.turn}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": None,
        }
        if chat.stream:
            return StreamingResponse(
                stream_answer(turn, chat, base, connections),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await whole_answer(request, turn, chat, base, connections)

    @app.get("/v1/events")
    async def events(request: Request):
        name = check_session(request.query_params.get("session", session), "session")
        wanted = [t.strip() for t in request.query_params.get("types", ",".join(DEFAULT_EVENTS)).split(",")]
        unknown = [t for t in wanted if t not in EVENT_TYPES]
        if unknown or not wanted:
            raise ApiError(
                400,
                f"unknown event type {unknown[0] if unknown else ''!r}; known: {', '.join(EVENT_TYPES)}",
                param="types",
            )
        partials = request.query_params.get("partials", "false").lower() in ("1", "true", "yes")
        client = await connections.get(name)
        return StreamingResponse(
            event_stream(client, name, tuple(EVENT_TYPES[t] for t in wanted), partials, connections),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def whole_answer(
    request: Request, turn: Turn, chat: ChatRequest, base: dict[str, Any], connections: Connections
) -> JSONResponse:
    pieces: list[str] = []
    connections.in_use[chat.session] = connections.in_use.get(chat.session, 0) + 1
    try:
        async for text in turn.events():
            if text is None:
                if await request.is_disconnected():
                    await turn.interrupt()
                    raise ApiError(499, "the client closed the request", code="client_closed")
                continue
            pieces.append(text)
    except ClientError as exc:
        raise client_failure(exc) from None
    finally:
        connections.in_use[chat.session] -= 1
    content = (turn.done.text if turn.done else "".join(pieces).strip()) + (
        sources_line(turn.done) if chat.citations else ""
    )
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": turn.usage(),
            "omnistream": turn.extra(chat.session),
        }
    )


async def stream_answer(
    turn: Turn, chat: ChatRequest, base: dict[str, Any], connections: Connections
) -> AsyncIterator[bytes]:
    """The answer as OpenAI's chunks: the role, the text deltas, the sources, the end (finish
    "stop", then usage if asked), "[DONE]"; an error as ``data: {"error": ...}``. A hang-up
    (the response task cancelled) interrupts the answer."""
    connections.in_use[chat.session] = connections.in_use.get(chat.session, 0) + 1
    idle = 0.0
    try:
        yield sse(chunk(base, {"role": "assistant", "content": ""}))
        async for text in turn.events():
            if text is None:
                idle += 1.0
                if idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield b": keep-alive\n\n"
                continue
            idle = 0.0
            yield sse(chunk(base, {"content": text}))
        if chat.citations and (line := sources_line(turn.done)):
            yield sse(chunk(base, {"content": line}))
        yield sse(chunk(base, {}, "stop"))
        if chat.include_usage:
            yield sse({**base, "choices": [], "usage": turn.usage(), "omnistream": turn.extra(chat.session)})
        yield b"data: [DONE]\n\n"
    except ClientError as exc:
        yield sse(client_failure(exc).body())
    finally:
        connections.in_use[chat.session] -= 1
        await turn.interrupt()  # only when no AnswerDone came: the client hung up


async def event_stream(
    client: AsyncClient,
    session: str,
    types: tuple[type[Message], ...],
    partials: bool,
    connections: Connections,
) -> AsyncIterator[bytes]:
    """Events of ``session`` as server-sent events named by type ("alert", "transcript", ...),
    each with its fields and ``at`` (its stream time as cited); a comment line every
    ``KEEPALIVE_S`` of silence."""
    names = {t: name for name, t in EVENT_TYPES.items()}
    connections.in_use[session] = connections.in_use.get(session, 0) + 1
    queue = client._listen()
    try:
        yield b": connected\n\n"
        quiet_since = time.monotonic()
        while True:
            quiet_for = time.monotonic() - quiet_since
            if quiet_for >= KEEPALIVE_S:
                quiet_since, quiet_for = time.monotonic(), 0.0
                yield b": keep-alive\n\n"
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_S - quiet_for)
            except TimeoutError:
                continue
            if type(event) not in types or event.session != session:
                continue
            if isinstance(event, Transcript) and not event.final and not partials:
                continue
            # every field, defaults too (the wire format leaves them out)
            payload = {"type": type(event).__name__, **msgspec.to_builtins(msgspec.structs.asdict(event))}
            payload["at"] = clock(event.ts)
            quiet_since = time.monotonic()
            yield sse(payload, names[type(event)])
    finally:
        client._listeners.discard(queue)
        connections.in_use[session] -= 1


# -- serving -----------------------------------------------------------------------------------------


def server(app: FastAPI, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="asyncio",
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,  # open event streams never end by themselves
    )
    return uvicorn.Server(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    server(app, host, port).run()


class ApiThread:
    """The API served from a background thread (``omnistream up --api``)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.server = server(app, host, port)
        self.thread = threading.Thread(target=self.server.run, name="openai-api", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the OpenAI-compatible API did not start (is its port in use?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
