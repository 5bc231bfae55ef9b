"""The demo page's player feed without a browser (fast): a session's spoken-answer chunks, as its
event reader files them, come out of ``on_speech`` numbered and in order as the JSON the page's
player reads (each value repeating the chunks sent just before), and a barge-in pause is told
apart from a cut. A real gateway process backs the session."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from omnistream.app.demo import SPEECH_RESENT, on_speech, speech_item, speech_payload
from omnistream.app.demo_session import DemoSession, SpeechItem
from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import AudioOut

from ..conftest import make_config


@pytest.fixture
def link(short_tmp: Path):
    launcher = Launcher(make_config(short_tmp, ("gateway",)), short_tmp / "run")
    launcher.start()
    session = DemoSession(launcher.run_dir)
    yield session
    session.close()
    launcher.shutdown()


def decode(item: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(item["pcm"]), "<i2").astype(np.float32) / 32767.0


def test_spoken_answer_chunks_reach_the_player_feed_in_order(link: DemoSession) -> None:
    feed = on_speech(link)
    first = np.linspace(-0.5, 0.5, 960, dtype=np.float32)
    second = np.full(480, 0.25, np.float32)

    def file(*events: AudioOut) -> None:  # as the reader thread files events from the gateway
        with link.changed:
            for event in events:
                link._file(event)
            link.changed.notify_all()

    def soon(*events: AudioOut) -> None:  # while the feed waits (it starts at page load)
        threading.Timer(0.2, file, events).start()

    soon(AudioOut(session=link.session, turn="t1", pcm=first, sample_rate=24000, seq=0))  # spoken question
    payload = json.loads(next(feed))
    assert payload["seq"] == 1 and payload["first"] == 0 and [i["turn"] for i in payload["items"]] == ["t1"]
    assert payload["items"][0]["rate"] == 24000
    np.testing.assert_allclose(decode(payload["items"][0]), first, atol=1e-4)
    assert link.turns["t1"].spoken_question  # filed as a spoken question's answer

    soon(
        AudioOut(session=link.session, turn="t1", pcm=second, seq=1),
        AudioOut(session=link.session, turn="t1", flush=True, seq=2),  # paused (barge-in heard)
    )
    payload = json.loads(next(feed))
    assert payload["seq"] == 2 and payload["first"] == 0  # chunk 0 again, then chunks 1 and 2
    assert [(bool(i["pcm"]), i["flush"], i["final"]) for i in payload["items"]] == [
        (True, False, False),
        (True, False, False),
        (False, True, False),
    ]
    np.testing.assert_allclose(decode(payload["items"][1]), second, atol=1e-4)
    assert not link.turns["t1"].flushed and not link.turns["t1"].audio_final  # a pause, not a cut
    soon(
        AudioOut(session="someone-else", turn="t9", pcm=second, seq=0),  # not this tab's
        AudioOut(session=link.session, turn="t1", flush=True, final=True, seq=3),  # cut
    )
    payload = json.loads(next(feed))
    assert payload["first"] == 0 and len(payload["items"]) == 4
    assert (payload["items"][-1]["turn"], payload["items"][-1]["flush"], payload["items"][-1]["final"]) == (
        "t1",
        True,
        True,
    )
    assert link.turns["t1"].flushed and link.turns["t1"].audio_final
    # a long answer: only the last SPEECH_RESENT chunks are repeated, numbered on
    soon(*(AudioOut(session=link.session, turn="t2", pcm=second, seq=k) for k in range(SPEECH_RESENT + 3)))
    payload = json.loads(next(feed))
    assert len(payload["items"]) == SPEECH_RESENT and payload["first"] == 4 + 3


def test_payload_clips_and_marks_empty_chunks() -> None:
    loud = np.array([2.0, -2.0, 0.5], np.float32)
    payload = json.loads(speech_payload([speech_item(SpeechItem("a", loud, 16000, False, False))], 3, 7))
    assert payload["seq"] == 7 and payload["first"] == 3
    np.testing.assert_allclose(decode(payload["items"][0]), [1.0, -1.0, 0.5], atol=1e-4)
    empty = speech_item(SpeechItem("a", None, 16000, True, True))
    assert empty == {"turn": "a", "rate": 16000, "pcm": "", "flush": True, "final": True}
