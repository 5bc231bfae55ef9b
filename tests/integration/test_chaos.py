"""Chaos: every process SIGKILLed in turn, twice, while the bundled recording streams in a loop
and questions keep arriving (real models, the fast LLM).

Checks: the launcher restarts each killed process; every question ends with an answer or a
clear error within a bound (never a hang); every record memory acknowledged (published a
``Record`` for) is still in its history at the end; both clients carried on by themselves (their
sockets reconnected) and the system answers again after the last kill.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from omnistream.app.client import Client, ClientError
from omnistream.protocol.messages import Record
from omnistream.protocol.sockets import make_socket, recv

from ..conftest import pid_alive
from ..util import wait_until
from .whole_system import Replay, whole_system

pytestmark = [pytest.mark.slow, pytest.mark.extended]

ROUNDS = int(os.environ.get("OMNISTREAM_CHAOS_ROUNDS", "2"))
ORDER = ("gateway", "perception", "memory", "reasoning", "speech", "bus")
ASK_BOUND_S = 160.0  # a question ends (answer or error) within this, whatever is killed
KILL_GAP_S = 5.0  # between kills within a round; each round ends when every process is back
KNOWN_ERRORS = (
    "reasoning restarted while answering",
    "no answer progress",
    "memory did not answer",
    "gateway restarted while answering",
    "unreachable",
    "no reply from the gateway",
    "[busy]",
    "interrupted",
)


@dataclass
class Outcome:
    question: str
    seconds: float
    text: str = ""
    error: str = ""


class Asker(threading.Thread):
    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.run_dir, self.stop = run_dir, threading.Event()
        self.outcomes: list[Outcome] = []

    def ask_once(self, client: Client, question: str) -> Outcome:
        start = time.monotonic()
        outcome = Outcome(question, 0.0)
        try:
            outcome.text = "".join(client.ask(question, ts=0.0, speak=False, timeout_s=ASK_BOUND_S + 30))
        except ClientError as exc:
            outcome.error = str(exc)
        outcome.seconds = time.monotonic() - start
        return outcome

    def run(self) -> None:
        questions = ["What is on screen?", "What did the reader say?", "Which word was written?"]
        with Client.connect(self.run_dir, timeout_s=30) as client:
            i = 0
            while not self.stop.is_set():
                self.outcomes.append(self.ask_once(client, questions[i % len(questions)]))
                i += 1
            self.client_status = client.status()


def test_every_stage_killed_in_turn_under_load(tmp_path_factory) -> None:
    overrides = {"reasoning.max_new_tokens": 24, "gateway.ask_timeout_s": 120.0}
    with whole_system(Path(tmp_path_factory.mktemp("chaos")), "chaos", **overrides) as (config, launcher):
        run_dir = launcher.run_dir
        records: dict[int, Record] = {}
        observer = make_socket(zmq.Context.instance(), zmq.SUB, RECONNECT_IVL=100)
        observer.connect(launcher.addresses.bus_out)
        observer.setsockopt(zmq.SUBSCRIBE, b"Record")
        feeder, asker = Replay(run_dir, status_at_end=True), Asker(run_dir)
        kills: list[tuple[str, int, float]] = []
        try:
            feeder.start()
            asker.start()

            def watch(seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    if observer.poll(50):
                        _, message = recv(observer)
                        if (
                            isinstance(message, Record)
                            and message.session == config.session
                            and message.kind in ("clip", "transcript")  # what history returns
                        ):
                            records[message.item_id] = message

            def all_back() -> bool:
                children = [launcher.children[n] for n in ORDER]
                return all(
                    c.ready and c.pid != old
                    for c, (_, old, _) in zip(children, kills[-len(ORDER) :], strict=True)
                )

            watch(8.0)
            for _ in range(ROUNDS):
                for name in ORDER:
                    child = launcher.children[name]
                    old = child.pid
                    os.kill(old, signal.SIGKILL)
                    kills.append((name, old, time.monotonic()))
                    watch(KILL_GAP_S)
                wait_until(
                    all_back,
                    180,
                    lambda: f"every process back: {launcher.status_rows()}",
                    every=lambda: watch(0.2),
                    interval=0,
                )
                assert not any(pid_alive(old) for _, old, _ in kills)
            watch(5.0)
            feeder.stop.set()
            asker.stop.set()
            feeder.join(ASK_BOUND_S + 60)
            asker.join(ASK_BOUND_S + 60)
            assert not asker.is_alive() and not feeder.is_alive(), "a client hung"

            # Restarts: each kill, one restart.
            for name in ORDER:
                assert launcher.children[name].restarts == ROUNDS, launcher.status_rows()
            # Questions: every one ended within the bound, with an answer or a known, clear error.
            outcomes = asker.outcomes
            assert outcomes, "no question was asked"
            for outcome in outcomes:
                assert outcome.seconds < ASK_BOUND_S, outcome
                assert outcome.text.strip() or any(e in outcome.error for e in KNOWN_ERRORS), outcome
            # (How many are answered rather than failed depends on the machine: on 2 loaded cores an
            # answer takes longer than the gaps between kills.)
            summary = [(round(o.seconds), o.text[:40] or o.error[:60]) for o in outcomes]
            # After the last kill the system answers again (same client class, fresh question).
            with Client.connect(run_dir, timeout_s=60) as client:
                final = "".join(client.ask("What is on screen?", speak=False, timeout_s=300))
                assert final.strip(), (client.last_done, summary)
                history = client.history(limit=5000)
                status = client.status()
            # Memory lost nothing it acknowledged.
            kept = {item.item_id for item in history.items}
            assert records, "memory acknowledged no record"
            lost = sorted(set(records) - kept)
            assert not lost, f"{len(lost)} acknowledged records missing, e.g. {records[lost[0]]}"
            # Session data (SQLite, WAL, spilled KV blocks) is owner-only.
            exposed = [
                f"{p} {p.stat().st_mode & 0o777:o}"
                for p in [config.data_dir, *config.data_dir.rglob("*")]
                if p.stat().st_mode & 0o077
            ]
            assert not exposed, exposed
            # Clients reconnected by themselves: both long-lived clients' last status came through.
            assert feeder.sent > 0 and asker.client_status.stages and feeder.reconnected_status.stages
            assert {"gateway", "perception", "memory", "reasoning", "speech"} <= set(status.stages)
            reasoning = status.stages["reasoning"].counters
            print(
                f"chaos: {len(kills)} kills in {time.monotonic() - kills[0][2]:.0f} s; questions: {summary}; "
                f"reasoning counters {reasoning}"
                + f"; {len(outcomes)} questions ({sum(bool(o.text) for o in outcomes)} answered); "
                f"{len(records)} records kept; frames/audio sent {feeder.sent}, dropped {feeder.dropped}"
            )
        finally:
            feeder.stop.set()
            asker.stop.set()
            observer.close(linger=0)
