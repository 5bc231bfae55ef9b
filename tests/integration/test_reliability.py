"""Gateway reliability with real processes: questions never wait forever (timeout error), too
many are refused with ``busy``, a restarted reasoning gets the unanswered ones again, audio
beyond the rate limit is dropped and counted, a restarted gateway is noticed by clients."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from omnistream.app.client import Client, ClientError
from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import AnswerDelta, AnswerDone, Ask, Interrupt, Stats
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

from ..conftest import launched
from ..util import wait_until


def supervise(launcher: Launcher, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        launcher.step(timeout_ms=50)


@pytest.fixture
def gateway(short_tmp: Path, request):
    yield from launched(short_tmp, ("gateway",), **getattr(request, "param", {}))


@pytest.mark.parametrize(
    "gateway", [{"gateway.ask_timeout_s": 2.0, "gateway.max_pending_asks": 2}], indirect=True
)
def test_unanswerable_questions_fail_with_a_clear_error_and_overload_is_refused(gateway: Launcher) -> None:
    with Client.connect(gateway.run_dir, timeout_s=10) as client:
        start = time.monotonic()
        with pytest.raises(ClientError, match=r"answer failed: no answer progress within 2 s"):
            for _ in client.ask("Is anyone there?", timeout_s=60):
                pass
        assert time.monotonic() - start < 10  # the gateway's timeout, not the client's 60 s
        assert client.last_done is not None and client.last_done.error
        client.send_ask("one", ts=0.0)
        client.send_ask("two", ts=0.0)
        with pytest.raises(ClientError, match=r"\[busy\] 2 questions are waiting") as refused:
            client.send_ask("three", ts=0.0)
        assert refused.value.code == "busy"
        time.sleep(3.0)  # both time out; then there is room again
        client.send_ask("four", ts=0.0)
        status = client.status().stages["gateway"].counters
    assert status["busy"] == 1 and status["asks_failed"] >= 3


def test_restarted_reasoning_gets_the_waiting_questions_again(gateway: Launcher) -> None:
    """A process that publishes ``Stats`` as "reasoning" (pid A, then pid B, as after a restart):
    the ask it never started is published again; the one it had started ends with an error."""
    addresses = Addresses.load(gateway.run_dir)
    ctx = zmq.Context.instance()
    pub = make_socket(ctx, zmq.PUB)
    pub.connect(addresses.bus_in)
    bus = make_socket(ctx, zmq.SUB)
    bus.connect(addresses.bus_out)
    bus.setsockopt(zmq.SUBSCRIBE, b"Ask")
    time.sleep(0.5)
    try:
        with Client.connect(gateway.run_dir, timeout_s=10) as client:
            send(pub, Stats(stage="reasoning", pid=111))
            started = client.send_ask("started question", ts=1.0)
            waiting = client.send_ask("waiting question", ts=2.0)
            seen = []
            while len(seen) < 2 and bus.poll(5000):
                seen.append(recv(bus)[1].turn)
            assert seen == [started, waiting]
            send(pub, AnswerDelta(turn=started, text="Part"))
            time.sleep(0.3)
            send(pub, Stats(stage="reasoning", pid=222))  # a new reasoning process
            assert bus.poll(5000), "the waiting question was not sent again"
            again = recv(bus)[1]
            assert isinstance(again, Ask) and again.turn == waiting and again.question == "waiting question"
            failed = wait_until(
                lambda: next(
                    (e for e in client.poll_events(0.1) if isinstance(e, AnswerDone) and e.turn == started),
                    None,
                ),
                5,
                "the started answer's end",
                interval=0,
            )
            assert "reasoning restarted while answering" in failed.error
            send(pub, AnswerDone(turn=waiting, text="answered by the new one"))
            time.sleep(0.3)
            counters = client.status().stages["gateway"].counters
            assert counters["asks_resent"] == 1 and counters["reasoning_restarts_seen"] == 1
    finally:
        pub.close(linger=0)
        bus.close(linger=0)


@pytest.mark.parametrize(
    "gateway", [{"gateway.max_audio_speed": 2.0, "gateway.audio_burst_s": 5.0}], indirect=True
)
def test_audio_faster_than_the_limit_is_dropped_and_counted(gateway: Launcher) -> None:
    with Client.connect(gateway.run_dir, timeout_s=10) as client:
        chunk = np.zeros(1600, np.float32)  # 0.1 s
        start = time.monotonic()
        for i in range(300):  # 30 s of audio in about 1.5 s (20x real time)
            client.push_audio(chunk, 16000, ts=i * 0.1, channel="scene")
            time.sleep(0.005)
        elapsed = time.monotonic() - start

        def every_chunk_counted() -> dict | None:
            counters = client.status().stages["gateway"].counters
            counted = counters.get("in_AudioChunk", 0) * 0.1 + counters.get("audio_dropped_s", 0)
            return counters if counted + client.audio_dropped * 0.1 >= 29.95 else None

        # (20 s: the gateway may lag behind on a loaded machine)
        counters = wait_until(every_chunk_counted, 20, "the gateway to count all 30 s", interval=0.5)
        accepted = counters.get("in_AudioChunk", 0) * 0.1
        dropped = counters.get("audio_dropped_s", 0)
        span = time.monotonic() - start  # the gateway took the chunks within this
    assert accepted + dropped + client.audio_dropped * 0.1 == pytest.approx(30.0, abs=0.05)
    assert accepted <= 5.0 + 2.0 * span + 0.11  # burst + rate x time
    assert dropped >= min(20.0, 30.0 - (5.0 + 2.0 * span) - 0.11 - client.audio_dropped * 0.1), (
        elapsed,
        span,
    )


def test_client_notices_a_gateway_restart_and_does_not_hang(gateway: Launcher, monkeypatch) -> None:
    from omnistream.app import client as client_module

    monkeypatch.setattr(client_module, "LOST_AFTER_S", 3.0)
    stop = threading.Event()
    supervisor = threading.Thread(
        target=lambda: [gateway.step(timeout_ms=50) for _ in iter(stop.is_set, True)]
    )
    supervisor.start()
    try:
        with Client.connect(gateway.run_dir, timeout_s=20) as client:
            old_pid = gateway.children["gateway"].pid
            answer = client.ask("Will the gateway survive?", timeout_s=120)
            threading.Timer(1.0, os.kill, (old_pid, signal.SIGKILL)).start()
            start = time.monotonic()
            with pytest.raises(ClientError, match="gateway restarted while answering"):
                for _ in answer:
                    pytest.fail("no answer was expected")
            assert time.monotonic() - start < 60
            new_pid = gateway.children["gateway"].pid
            assert new_pid != old_pid and client.gateway_pid == new_pid
            assert client.status().stages["gateway"].pid == new_pid
    finally:
        stop.set()
        supervisor.join()


def test_async_client_notices_a_gateway_restart_too(gateway: Launcher, monkeypatch) -> None:
    from omnistream.app import async_client as async_module
    from omnistream.app.async_client import AsyncClient

    monkeypatch.setattr(async_module, "LOST_AFTER_S", 3.0)
    stop = threading.Event()
    supervisor = threading.Thread(
        target=lambda: [gateway.step(timeout_ms=50) for _ in iter(stop.is_set, True)]
    )
    supervisor.start()

    async def scenario() -> float:
        async with await AsyncClient.connect(gateway.run_dir, timeout_s=20) as client:
            old_pid = gateway.children["gateway"].pid
            assert client.gateway_pid == old_pid
            threading.Timer(1.0, os.kill, (old_pid, signal.SIGKILL)).start()
            start = time.monotonic()
            with pytest.raises(ClientError, match="gateway restarted while answering"):
                async for _ in client.ask("Still there?", timeout_s=120):
                    pytest.fail("no answer was expected")
            return time.monotonic() - start

    try:
        assert asyncio.run(scenario()) < 60
    finally:
        stop.set()
        supervisor.join()


def test_a_question_interrupted_while_it_waits_is_dropped(gateway: Launcher) -> None:
    """The stage loop drops an ``Ask`` whose ``Interrupt`` came before it was handled (the
    gateway interrupts every question it ends), so a slow reasoner skips stale questions."""
    from omnistream.protocol.runtime import Runtime

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    umask = os.umask(0o077)
    runtime = Runtime("probe", gateway.run_dir)
    pub = make_socket(zmq.Context.instance(), zmq.PUB)
    pub.connect(runtime.addresses.bus_in)
    try:
        runtime.subscribe(Ask, Interrupt)
        time.sleep(0.5)
        for turn in ("keep", "stale"):
            send(pub, Ask(turn=turn, question="q"))
        poll = lambda: runtime.poll(0.1)  # noqa: E731
        wait_until(lambda: len(runtime._pending) >= 2, 5, "both questions", every=poll, interval=0)
        send(pub, Interrupt(turn="stale", reason="timed out"))
        send(pub, Interrupt(turn="", reason="barge-in"))  # no turn: stops the current answer only
        wait_until(
            lambda: runtime.counters["asks_cancelled"] >= 1,
            5,
            "the stale question cancelled",
            every=poll,
            interval=0,
        )
        time.sleep(0.2)
        runtime.poll(0.1)
        pending = runtime.take_pending()
        assert [m.turn for m in pending if isinstance(m, Ask)] == ["keep"]
        assert sum(isinstance(m, Interrupt) for m in pending) == 2  # still delivered to the stage
        assert runtime.cancelled(Ask(turn="stale", question="q"))
        assert not runtime.cancelled(Ask(turn="stale", question="q", session="other"))
    finally:
        pub.close(linger=0)
        runtime.close()
        os.umask(umask)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
