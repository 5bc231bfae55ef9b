"""`omnistream bench speech`, response part: end of the user's question -> first assistant audio.

A LibriVox clip is spoken into the speech stage in real time; the stage's ``Ask`` is answered
either by a scripted answer streamed at 50 tokens/s (one word per 20 ms: the speech stage's own
share, with the LLM's decode rate from the issue) or by the real LLM (``reasoning.model`` from
the configuration, e.g. ``OMNISTREAM__REASONING__MODEL=qwen2.5-coder-0.5b``) running the
reasoning stage's ``Answerer`` in its own process, as in the system (empty memory, no retrieval
request). Each trial's ``turns.Timeline`` gives the breakdown; the true end of speech is where
the clip's RMS falls below speech level. Every figure is measured for the current settings and,
as its baseline, for the settings before issue #4's latency work (whisper's 30 s window, end of
turn only after ``min_silence_s`` + 0.15 s grace, first phrase at a clause end), in one run.

Transport (``AudioOut`` from the speech stage to a client) is measured on its own: through a
real bus proxy and a re-publishing hop (the gateway's path), with the wire codec, over ipc.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

from omnistream.protocol.config import SpeechConfig, load_config
from omnistream.protocol.messages import (
    PREEMPTION_DISCARDED,
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioOut,
    Draft,
    Interrupt,
)
from omnistream.protocol.sockets import make_socket, recv, send
from omnistream.speech.turns import SPANS

BEFORE = {
    "turn_end_s": 10.0,
    "turn_grace_s": 0.15,
    "first_phrase_words": 0,
    "asr_window": "full",
    "read_ahead": False,
    "preemptive": False,
    "early_final_s": 0.2,
}
BEFORE_NAME = (
    "before: 30 s whisper window, 0.5 s silence + 0.15 s grace, first phrase at a clause end, "
    "question not read ahead"
)
# Issue #21: preemptive generation (off by default), against the defaults in the same run.
PREEMPTION = {"preemptive": True, "early_final_s": 0.1}
NO_PREEMPTION_NAME = "defaults: no preemptive generation (speculative final after 0.2 s of silence)"
SCRIPTED = "It was a monarch butterfly on a purple flower, near the window, and then it flew away."
SCRIPTED_S_PER_WORD = 0.02


def _llm_process(conn) -> None:
    """Child process: load the configured LLM; read ("draft", question) requests ahead (as the
    reasoning stage does with a ``Draft``) and answer ("ask", turn, question) requests with
    streamed pieces until a "stop" arrives."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from omnistream.reasoning.answer import Answerer
    from omnistream.reasoning.llm.engine import LLMEngine
    from omnistream.reasoning.llm.prepare import prepare_llm

    config = load_config()
    engine = LLMEngine(
        prepare_llm(config.reasoning.model, config.cache_dir),
        config.reasoning.dtype,
        config.reasoning.threads,
    )
    answerer = Answerer(engine)
    conn.send(("ready", config.reasoning.model))
    while (request := conn.recv()) is not None:
        if request == "stop":
            continue
        if request[0] == "draft":
            draft = Draft(session="bench", question=request[1])
            answerer.prepare(draft, None if answerer.has_prepared("bench") else [])
            continue
        _, turn, question = request
        ask = Ask(turn=turn, question=question, session="bench")
        prepared = answerer.take_prepared(ask)
        for piece, _ in answerer.answer(ask, [], 32, lambda: conn.poll(), prepared):
            conn.send(("delta", turn, piece))
        conn.send(("done", turn, ""))


class LLM:
    """The reasoning stage's answering code in a process of its own."""

    def __init__(self, progress: Callable[[str], None]):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_llm_process, args=(child,), daemon=True)
        self.process.start()
        if not self.conn.poll(600):
            raise TimeoutError("speech bench: the LLM did not load in 10 minutes")
        _, self.model = self.conn.recv()
        progress(f"speech: LLM {self.model} loaded")

    def ask(self, turn: str, question: str) -> None:
        self.conn.send(("ask", turn, question))

    def draft(self, question: str) -> None:
        self.conn.send(("draft", question))

    def stop(self) -> None:
        self.conn.send("stop")

    def pieces(self) -> list[tuple[str, str, str]]:
        out = []
        while self.conn.poll():
            out.append(self.conn.recv())
        return out

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def answer_each_ask(driver, llm: LLM | None) -> Callable[[], None]:
    """Make ``driver`` answer every ``Ask`` the stage publishes; returns the pump to call on
    every loop pass (it feeds due answer pieces to the stage)."""
    scripted: dict[str, float] = {}
    asked: set[str] = set()
    publish = driver.stage.emit

    def on_publish(message) -> None:
        publish(message)
        if isinstance(message, Draft) and llm is not None:
            llm.draft(message.question)
        if isinstance(message, Interrupt) and message.reason == PREEMPTION_DISCARDED:
            scripted.pop(message.turn, None)
            if llm is not None:
                llm.stop()  # the child stops at its next piece
        if isinstance(message, Ask) and message.turn in asked:
            return  # the confirmation of a tentative Ask: its answer is on its way
        if isinstance(message, Ask):
            asked.add(message.turn)
            if llm is not None:
                llm.ask(message.turn, message.question)
            else:
                scripted[message.turn] = time.monotonic()

    driver.stage.emit = on_publish

    def pump() -> None:
        now = time.monotonic()
        for turn, start in list(scripted.items()):
            words = SCRIPTED.split(" ")
            sent = driver.sent_words.get(turn, 0)
            due = min(int((now - start) / SCRIPTED_S_PER_WORD) + 1, len(words))
            for index in range(sent, due):
                driver.stage.handle(
                    AnswerDelta(turn=turn, text=(" " if index else "") + words[index], seq=index)
                )
            driver.sent_words[turn] = due
            if due == len(words):
                driver.stage.handle(AnswerDone(turn=turn, text=SCRIPTED))
                del scripted[turn]
        if llm is not None:
            for kind, turn, text in llm.pieces():
                if kind == "delta":
                    driver.stage.handle(AnswerDelta(turn=turn, text=text))
                else:
                    driver.stage.handle(AnswerDone(turn=turn, text=""))
                    driver.llm_done.add(turn)

    return pump


def turn_trials(
    driver, clips, trials: int, voiced_span, captured_at, progress: Callable[[str], None], llm: LLM | None
) -> list[dict[str, float]]:
    """Speak ``trials`` clips as questions; per trial, seconds of each span (``turns.SPANS``) plus
    the spans from the true end of speech."""
    driver.pump = answer_each_ask(driver, llm)
    lead_in = np.zeros(16000 // 4, np.float32)
    results = []
    for trial in range(trials):
        audio, _ = clips[trial % len(clips)]
        _, end = voiced_span(audio)
        walls = driver.mic(np.concatenate([lead_in, audio]))
        end_wall = captured_at(walls, len(lead_in) + end)

        def spoken(end_wall: float = end_wall) -> Ask | None:
            asks = [m for w, m in driver.out if w >= end_wall and isinstance(m, Ask)]
            if not asks:
                return None
            audio = driver.first(AudioOut, end_wall, lambda m: m.turn == asks[-1].turn and m.pcm is not None)
            return asks[-1] if audio is not None else None

        driver.silence_until(lambda: spoken() is not None, timeout_s=120)
        ask = spoken()
        driver.stage.handle(Interrupt(session=ask.session, turn=ask.turn))  # first audio is all we need
        if llm is not None:
            llm.stop()
        driver.silence_until(lambda turn=ask.turn: idle(driver, llm, turn), timeout_s=120)
        # Past ``continue_s``: the next clip is a new question, not the user going on with this one.
        driver.mic(np.zeros(int(16000 * (driver.stage.config.continue_s + 0.25)), np.float32))
        timeline = next(t for t in driver.stage.timelines if t.turn == ask.turn)
        spans = dict(timeline.spans())
        marks = timeline.marks
        spans["end of user speech -> VAD's last speech window (VAD lag)"] = marks["speech_end"] - end_wall
        spans["end of user speech -> Ask"] = marks["ask"] - end_wall
        spans["end of user speech -> first AudioOut sent"] = marks["first_audio"] - end_wall
        if timeline.asr_s is not None:
            spans["final ASR compute (one whisper pass over the utterance)"] = timeline.asr_s
        if "confirmed" in marks:  # preemptive generation: asked tentatively, confirmed here
            spans["end of user speech -> turn confirmed (tentative Ask's audio released)"] = (
                marks["confirmed"] - end_wall
            )
        results.append(spans)
        progress(f"speech: trial {trial}: {1000 * spans['end of user speech -> first AudioOut sent']:.0f} ms")
    return results


def idle(driver, llm: LLM | None, turn: str) -> bool:
    """Nothing spoken or heard, and the LLM done with ``turn``."""
    return not driver.stage.turns and not driver.stage.hearing() and (llm is None or turn in driver.llm_done)


def breakdown_rows(
    label: str, now: list[dict], before: list[dict], names: list[str], before_name: str = BEFORE_NAME
) -> list[dict]:
    rows = []
    for name in names:
        values = [r[name] for r in now if name in r]
        base = [r[name] for r in before if name in r]
        if not values:
            continue
        for q in (50, 95):
            row = {
                "name": f"{name}, {label} p{q}",
                "value": float(np.percentile(values, q) * 1000),
                "unit": "ms",
            }
            row["n"] = len(values)
            if base:
                row["baseline_name"] = before_name
                row["baseline"] = float(np.percentile(base, q) * 1000)
            rows.append(row)
    return rows


SPEECH_SPANS = [
    "end of user speech -> VAD's last speech window (VAD lag)",
    *(name for name, _, _ in SPANS[:3]),
    "final ASR compute (one whisper pass over the utterance)",
    "end of user speech -> Ask",
    "end of user speech -> turn confirmed (tentative Ask's audio released)",
    *(name for name, _, _ in SPANS[4:7]),
    "end of user speech -> first AudioOut sent",
]
LLM_SPANS = [
    "end of user speech -> Ask",
    "end of user speech -> turn confirmed (tentative Ask's audio released)",
    SPANS[3][0],
    SPANS[4][0],
    SPANS[5][0],
    "end of user speech -> first AudioOut sent",
]


def transport_rows(messages: int = 300) -> list[dict]:
    """``AudioOut`` (40 ms at 16 kHz) from a PUB through an XSUB/XPUB proxy (the bus) and a
    SUB -> decode -> encode -> PUB hop (the gateway's re-publish) to a client SUB, over ipc."""
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        addr = {name: f"ipc://{Path(tmp) / name}" for name in ("in", "out", "client")}
        xsub, xpub = make_socket(ctx, zmq.XSUB), make_socket(ctx, zmq.XPUB)
        xsub.bind(addr["in"])
        xpub.bind(addr["out"])
        threading.Thread(target=lambda: _proxy(xsub, xpub), daemon=True).start()
        gateway_in, gateway_out = make_socket(ctx, zmq.SUB), make_socket(ctx, zmq.PUB)
        gateway_in.connect(addr["out"])
        gateway_in.setsockopt(zmq.SUBSCRIBE, b"")
        gateway_out.bind(addr["client"])
        stop = threading.Event()

        def gateway() -> None:
            while not stop.is_set():
                if gateway_in.poll(50):
                    send(gateway_out, recv(gateway_in)[1])

        threading.Thread(target=gateway, daemon=True).start()
        client = make_socket(ctx, zmq.SUB)
        client.connect(addr["client"])
        client.setsockopt(zmq.SUBSCRIBE, b"")
        speech = make_socket(ctx, zmq.PUB)
        speech.connect(addr["in"])
        time.sleep(0.5)  # subscriptions propagate
        pcm = (np.random.default_rng(0).standard_normal(640) * 0.1).astype(np.float32)
        latencies = []
        for seq in range(messages):
            sent = time.monotonic()
            send(speech, AudioOut(turn="t", pcm=pcm, sample_rate=16000, seq=seq))
            if client.poll(1000):
                recv(client)
                latencies.append(time.monotonic() - sent)
            time.sleep(0.005)
        stop.set()
        time.sleep(0.1)
    ctx.destroy(linger=0)
    name = "transport: AudioOut speech PUB -> bus proxy -> gateway hop -> client SUB (ipc, codec)"
    return [
        {
            "name": f"{name} p{q}",
            "value": float(np.percentile(latencies, q) * 1000),
            "unit": "ms",
            "n": len(latencies),
        }
        for q in (50, 95)
    ]


def _proxy(xsub, xpub) -> None:
    # The context is destroyed under it at the end: "Socket operation on non-socket" (ENOTSOCK)
    # or ContextTerminated, depending on which socket closes first.
    with contextlib.suppress(zmq.ContextTerminated, zmq.ZMQError):
        zmq.proxy(xsub, xpub)


def before_config() -> SpeechConfig:
    return SpeechConfig(**BEFORE)


def preemption_config() -> SpeechConfig:
    return SpeechConfig(**PREEMPTION)


def preemption_rows(label: str, counters: dict[str, float]) -> list[dict]:
    """How often the tentative answer was discarded, and how often the latest partial transcript
    already made the final question (what starting on it at the VAD's end would have won)."""
    made = counters.get("preemptions", 0)
    checked = counters.get("finals_after_partial", 0)
    return [
        {"name": f"preemptive Asks, {label}", "value": made, "unit": "asks"},
        {
            "name": f"... discarded (the user went on, or the final transcript differed), {label}",
            "value": counters.get("preemptions_discarded", 0),
            "unit": f"of {made:.0f}",
        },
        {
            "name": f"final question = the latest partial transcript's, {label}",
            "value": counters.get("finals_same_as_partial", 0),
            "unit": f"of {checked:.0f}",
        },
    ]
