"""Hardening against absurd requests and failing handlers (issue #18, items 3 and 4).

Every string and list field of every client request is bounded at the gateway; memory takes a
history request's kinds once each; a handler that raises (``stage.handle``, a ROUTER's reader)
is logged, counted and answered, and the stage keeps running; a receive step takes a bounded
number of messages; audio and frames are budgeted per client connection, not only per session;
a chunk and a frame have a size limit. Real sockets, in this process; the tests through gateway
and memory processes are in tests/integration/test_hardening.py.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from omnistream.app.gateway import CLIENT_REQUESTS, GatewaySockets, GatewayStage, check_request
from omnistream.memory.stage import MemoryStage, router_outlet, serve_router
from omnistream.memory.store import MemoryStore
from omnistream.protocol.config import save_config
from omnistream.protocol.messages import (
    Ask,
    AudioChunk,
    Clip,
    Error,
    HistoryRequest,
    Interrupt,
    Message,
    StatusRequest,
    Transcript,
    VideoFrame,
    Watch,
)
from omnistream.protocol.runtime import BUS, Runtime
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

from ..conftest import make_config
from .test_memory_and_reasoning import FakeEmbedder

BIG = 100 << 20  # sockets in these tests take what the gateway may be sent


# -- helpers ---------------------------------------------------------------------------------------


def dealer(endpoint: str) -> zmq.Socket:
    sock = make_socket(zmq.Context.instance(), zmq.DEALER, hwm=100_000, max_message_bytes=BIG)
    sock.connect(endpoint)
    return sock


def request(sock: zmq.Socket, message: Message, request_id: str, timeout_s: float = 20.0) -> Message:
    """Send ``message`` and return the reply carrying ``request_id`` (others are skipped)."""
    send(sock, message)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            reply = recv(sock)[1]
            if getattr(reply, "request_id", None) == request_id:
                return reply
    raise AssertionError(f"no reply to {type(message).__name__} {request_id!r}")


@pytest.fixture
def probe_runtime(short_tmp: Path, request) -> Iterator[Runtime]:
    """A ``Runtime`` in this process, on a run directory with no bus: the test binds the bus
    sockets it needs itself. The SIGTERM/SIGINT handlers it installs are restored afterwards."""
    run_dir = short_tmp / "run"
    run_dir.mkdir()
    save_config(
        make_config(short_tmp, ("gateway",), **getattr(request, "param", {})), run_dir / "config.json"
    )
    Addresses.for_run_dir(run_dir).save(run_dir)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    runtime = Runtime("probe", run_dir)
    yield runtime
    runtime.close()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


# -- item 3: every request field bounded ---------------------------------------------------------


BASE: dict[type, Message] = {
    Ask: Ask(turn="t", question="what is on the table?"),
    VideoFrame: VideoFrame(image=np.zeros((2, 2, 3), np.uint8)),
    AudioChunk: AudioChunk(pcm=np.zeros(160, np.float32)),
    Interrupt: Interrupt(turn="t"),
    Watch: Watch(watch_id="w", condition="a person enters"),
    StatusRequest: StatusRequest(request_id="s"),
    HistoryRequest: HistoryRequest(request_id="h"),
}


def oversized(info: msgspec.inspect.Type) -> Any:
    """A value of the field's type far beyond any sane bound, or None for fields whose values
    the decoder already restricts (Literal strings, numbers, ndarrays: checked elsewhere)."""
    if isinstance(info, msgspec.inspect.StrType):
        return "x" * 100_000
    if isinstance(info, msgspec.inspect.ListType):
        item = info.item_type
        if isinstance(item, msgspec.inspect.LiteralType):
            return [item.values[0]] * 40_000
        if isinstance(item, msgspec.inspect.StrType):
            return ["x"] * 40_000
        raise AssertionError(f"a client request has a list of {item}: bound it in check_request")
    return None


def test_every_string_and_list_field_of_every_client_request_is_bounded() -> None:
    config = make_config(Path("/tmp/unused"), ("gateway",)).gateway
    checked = []
    assert set(BASE) == set(CLIENT_REQUESTS), "a new client request: add it to BASE"
    for message_type, base in BASE.items():
        assert check_request(base, config) is None, message_type
        for field in msgspec.inspect.type_info(message_type).fields:
            value = oversized(field.type)
            if value is None:
                continue
            reason = check_request(msgspec.structs.replace(base, **{field.name: value}), config)
            assert reason is not None and field.name in reason, (message_type.__name__, field.name, reason)
            checked.append(f"{message_type.__name__}.{field.name}")
    assert {"HistoryRequest.kinds", "VideoFrame.source", "Ask.choices", "Watch.condition"} <= set(checked)
    # kinds: each known kind at most once
    for kinds, ok in ((["clip", "event", "synopsis"], True), (["clip", "clip"], False)):
        reason = check_request(HistoryRequest(request_id="h", kinds=kinds), config)
        assert (reason is None) == ok, (kinds, reason)


def test_a_chunk_and_a_frame_have_a_size_limit() -> None:
    config = make_config(Path("/tmp/unused"), ("gateway",)).gateway
    # 59 s at 192 kHz float32: 45 MB in one chunk, under the 60 s limit
    chunk = AudioChunk(pcm=np.zeros(192_000 * 59, np.float32), sample_rate=192_000)
    reason = check_request(chunk, config)
    assert reason is not None and "AudioChunk.pcm" in reason and str(4 << 20) in reason, reason
    assert check_request(AudioChunk(pcm=np.zeros(16_000 * 60, np.float32)), config) is None  # 3.84 MB
    frame = VideoFrame(image=np.zeros((4000, 4000, 3), np.uint8))  # 48 MB, sides under 8192
    reason = check_request(frame, config)
    assert reason is not None and "VideoFrame.image" in reason and "max_frame_bytes" in reason, reason
    assert check_request(VideoFrame(image=np.zeros((2160, 3840, 3), np.uint8)), config) is None


# -- item 3: no handler error kills a stage ----------------------------------------------------------


class FaultyStore(MemoryStore):
    """The real store, with one injected failure: the next ``between`` raises."""

    fail_next = False

    def between(self, *args, **kwargs):  # type: ignore[override]
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected disk failure")
        return super().between(*args, **kwargs)


def test_memory_router_answers_a_failed_request_and_serves_the_next(short_tmp: Path) -> None:
    counters: dict[str, float] = defaultdict(float)
    store = FaultyStore(short_tmp / "m.sqlite", FakeEmbedder.dim)
    stage = MemoryStage(make_config(short_tmp, ("memory",)).memory, store, FakeEmbedder(), counters=counters)  # type: ignore[arg-type]
    stage.handle(
        Clip(session="k", ts=5.0, t0=0.0, clip_id=1, features=np.ones(8, np.float32), description="cup")
    )
    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER)
    router.bind(f"ipc://{short_tmp}/memory")
    reply = router_outlet(router)  # as memory's process wires it: replies to the sender's DEALER
    stage.emit = lambda message, to=BUS: reply(message, to) if to.channel == "client" else True
    client = dealer(f"ipc://{short_tmp}/memory")
    try:
        store.fail_next = True
        send(client, HistoryRequest(session="k", request_id="one"))
        send(client, HistoryRequest(session="k", request_id="two"))
        replies: list[Message] = []
        deadline = time.monotonic() + 10
        while len(replies) < 2 and time.monotonic() < deadline:
            if router.poll(100):
                serve_router(stage, router, 1000, 32 << 20)  # raised out of the stage's loop before the fix
            while client.poll(0):
                replies.append(recv(client)[1])
        assert [type(r).__name__ for r in replies] == ["Error", "History"], replies
        failed, served = replies
        assert failed.code == "stage_error" and failed.request_id == "one"  # type: ignore[union-attr]
        assert "injected disk failure" in failed.message  # type: ignore[union-attr]
        assert served.request_id == "two" and [i.text[:3] for i in served.items] == ["cup"]  # type: ignore[union-attr]
        assert counters["handler_errors"] == 1
    finally:
        router.close(linger=0)
        client.close(linger=0)
        store.close()


def test_runtime_keeps_running_after_a_handler_raises(probe_runtime: Runtime, short_tmp: Path) -> None:
    """One message makes the stage's ``handle`` raise, one makes a ROUTER reader raise; the
    runtime logs, counts and reports each and handles the messages after them."""
    runtime = probe_runtime
    ctx = zmq.Context.instance()
    addresses = runtime.addresses
    bus_out = make_socket(ctx, zmq.PUB)  # what the bus delivers to the stage
    bus_out.bind(addresses.bus_out)
    bus_in = make_socket(ctx, zmq.SUB)  # what the stage publishes
    bus_in.bind(addresses.bus_in)
    bus_in.setsockopt(zmq.SUBSCRIBE, b"Error")
    router = make_socket(ctx, zmq.ROUTER)
    router.bind(f"ipc://{short_tmp}/probe")
    client = dealer(f"ipc://{short_tmp}/probe")
    handled: list[str] = []

    class Stage:
        name = "probe"

        def handle(self, message: Message) -> None:
            if isinstance(message, Transcript) and message.text == "boom":
                raise ValueError("injected handler failure")
            handled.append(f"bus:{getattr(message, 'text', '')}")

    def on_request(sock: zmq.Socket) -> None:
        while True:
            try:
                _, message = recv(sock, prefix_frames=1, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if message.question == "boom":  # type: ignore[attr-defined]
                raise RuntimeError("injected reader failure")
            handled.append(f"router:{message.question}")  # type: ignore[attr-defined]

    runtime.subscribe(Transcript)
    runtime.add_socket(router, on_request)
    deadline = time.monotonic() + 20
    sent_bus = False

    published: list[Message] = []

    def tick() -> None:
        nonlocal sent_bus
        while bus_in.poll(0):
            published.append(recv(bus_in)[1])
        if not sent_bus and (not handled or not published):  # until both directions are through
            send(bus_out, Transcript(t0=0.0, text="probe"))
            runtime.publish(Error(code="probe", message="probe"))
        elif not sent_bus:
            sent_bus = True
            for text in ("boom", "after"):
                send(bus_out, Transcript(t0=0.0, text=text))
            for question in ("first", "boom", "second"):
                send(client, Ask(turn=question, question=question))
        failures = [m for m in published if isinstance(m, Error) and m.code == "stage_error"]
        done = {"bus:after", "router:second"} <= set(handled) and len(failures) >= 2
        if done or time.monotonic() > deadline:
            runtime.running = False

    try:
        runtime.run(Stage(), tick=tick, poll_s=0.02)
        assert {"bus:after", "router:first", "router:second"} <= set(handled), handled
        assert runtime.counters["handler_errors"] == 2
        while bus_in.poll(500):
            published.append(recv(bus_in)[1])
        errors = [m for m in published if isinstance(m, Error) and m.code != "probe"]
        assert all(e.code == "stage_error" for e in errors) and len(errors) == 2, errors
        assert any("Transcript" in e.message and "injected handler failure" in e.message for e in errors)
        assert any("injected reader failure" in e.message for e in errors)
    finally:
        for sock in (bus_out, bus_in, router, client):
            sock.close(linger=0)


def test_gateway_answers_a_request_whose_handling_fails_and_serves_the_next(probe_runtime: Runtime) -> None:
    sockets = GatewaySockets(probe_runtime)
    gateway = sockets.stage
    served = gateway.on_request

    def failing_once(message: Message, client: tuple = ("connection", b"")) -> Message | None:
        if getattr(message, "request_id", "") == "boom":
            raise KeyError("injected gateway failure")
        return served(message, client)

    gateway.on_request = failing_once  # type: ignore[method-assign]
    client = dealer(probe_runtime.addresses.gateway)
    try:
        for request_id in ("boom", "after"):
            send(client, StatusRequest(request_id=request_id))
        replies: list[Message] = []
        deadline = time.monotonic() + 10
        while len(replies) < 2 and time.monotonic() < deadline:
            probe_runtime.poll(0.05)
            while client.poll(0):
                replies.append(recv(client)[1])
        assert [type(r).__name__ for r in replies] == ["Error", "Status"], replies
        assert replies[0].code == "stage_error" and replies[0].request_id == "boom"  # type: ignore[union-attr]
        assert "injected gateway failure" in replies[0].message  # type: ignore[union-attr]
        assert replies[1].request_id == "after"  # type: ignore[union-attr]
        assert probe_runtime.counters["handler_errors"] == 1
    finally:
        client.close(linger=0)
        sockets.close()


# -- item 4: bounded receive, per-connection budgets ------------------------------------------------


@pytest.mark.parametrize("probe_runtime", [{"bus.poll_max_messages": 100}], indirect=True)
def test_poll_takes_a_bounded_batch_and_leaves_the_rest_queued(probe_runtime: Runtime) -> None:
    runtime = probe_runtime
    bus_out = make_socket(zmq.Context.instance(), zmq.PUB, hwm=10_000)
    bus_out.bind(runtime.addresses.bus_out)
    runtime.subscribe(Transcript)
    try:
        deadline = time.monotonic() + 10
        while not runtime.poll(0.05):  # the subscription has reached the publisher
            assert time.monotonic() < deadline
            send(bus_out, Transcript(t0=0.0, text="probe"))
        time.sleep(0.2)
        runtime.poll(0.0)  # late probes
        runtime.take_pending()
        for i in range(250):
            send(bus_out, Transcript(t0=float(i), text=f"t{i}"))
        time.sleep(0.5)  # all 250 wait in the SUB socket
        sizes = []
        got: list[Message] = []
        while len(got) < 250 and time.monotonic() < deadline + 10:
            batch = runtime.poll(0.1)
            sizes.append(len(batch))
            got += batch
        assert sizes[:3] == [100, 100, 50], sizes
        assert [m.text for m in got] == [f"t{i}" for i in range(250)]  # type: ignore[attr-defined]
    finally:
        bus_out.close(linger=0)


# -- item 2: what one client may open ------------------------------------------------------------


@pytest.mark.parametrize(
    "probe_runtime",
    [{"gateway.sessions_per_client": 4, "gateway.client_session_idle_s": 0.5}],
    indirect=True,
)
def test_a_client_may_name_a_bounded_number_of_sessions(probe_runtime: Runtime) -> None:
    """A loop over new session names (a tab reloaded, a script) stops at the limit with an Error
    naming it; names in use keep working, another client has its own, idle names are released."""
    gateway = GatewayStage(probe_runtime.config, probe_runtime.emit, probe_runtime.counters)
    chunk = np.zeros(160, np.float32)
    one, other = ("connection", b"one"), ("connection", b"other")
    try:
        replies = [gateway.on_request(AudioChunk(session=f"s{i}", pcm=chunk), one) for i in range(50)]
        assert replies[:4] == [None] * 4  # accepted (published, nothing to answer)
        refused = replies[4:]
        assert all(isinstance(r, Error) and r.code == "too_many_sessions" for r in refused), refused
        assert "gateway.sessions_per_client = 4" in refused[0].message  # type: ignore[union-attr]
        assert probe_runtime.counters["in_AudioChunk"] == 4
        assert probe_runtime.counters["sessions_refused"] == 46
        ask = gateway.on_request(Ask(session="s99", turn="q", question="what?"), one)
        assert isinstance(ask, Error) and ask.code == "too_many_sessions" and ask.request_id == "q"
        assert gateway.on_request(AudioChunk(session="s2", pcm=chunk), one) is None  # in use
        assert gateway.on_request(AudioChunk(session="s7", pcm=chunk), other) is None
        assert len(gateway.client_sessions[one]) == 4
        time.sleep(0.6)  # every name of the first client idle: released
        assert gateway.on_request(AudioChunk(session="s50", pcm=chunk), one) is None
        assert list(gateway.client_sessions[one]) == ["s50"]
    finally:
        gateway.close()


def test_one_bounded_read_for_every_loop_takes_at_most_its_messages_and_bytes() -> None:
    """``read_bounded`` (the runtime's bus sockets, the gateway's and memory's ROUTERs): at most
    ``max_messages``, and once ``max_bytes`` is reached no more (but always one, however large);
    what is left waits in the socket for the next read, in order."""
    from omnistream.protocol.sockets import read_bounded

    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER)
    address = "inproc://bounded-read"
    router.bind(address)
    client = make_socket(ctx, zmq.DEALER)
    client.connect(address)
    try:
        for index in range(7):
            client.send_multipart([b"%d" % index, b"x" * 100])
        assert router.poll(5000)
        got: list[bytes] = []

        def take(frames: list) -> None:
            assert len(frames) == 3  # the sender's identity, then its frames
            got.append(frames[1].bytes)

        assert not read_bounded(router, take, 3, 1 << 20)
        assert got == [b"0", b"1", b"2"]
        assert read_bounded(router, take, 100, 150)  # 101 + 101 bytes: the byte bound stops it
        assert got[3:] == [b"3", b"4"]
        assert read_bounded(router, take, 100, 1)  # one message, however large
        assert got[5:] == [b"5"]
        assert not read_bounded(router, take, 100, 1 << 20)
        assert got[6:] == [b"6"] and not read_bounded(router, take, 100, 1 << 20)
    finally:
        router.close(linger=0)
        client.close(linger=0)
