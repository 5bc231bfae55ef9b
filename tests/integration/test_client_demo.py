"""The demo page's server side without a browser: sessions against a real gateway process, and the
pure helpers (citations, browser audio). The page itself is tested in tests/browser."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from omnistream.app.client import Client, ClientError
from omnistream.app.demo import build_page, highlight_citations, on_ask, on_watch, stats_rows, to_mono_float
from omnistream.app.demo_session import DemoSession, wav_bytes
from omnistream.app.launcher import Launcher

from ..util import wait_until


def test_each_tab_gets_its_own_session_and_requests_reach_the_gateway(gateway_and_memory: Launcher) -> None:
    # (memory too: it stores a watch before the gateway acknowledges it)
    first, second = DemoSession(gateway_and_memory.run_dir), DemoSession(gateway_and_memory.run_dir)
    try:
        assert first.session != second.session and first.session.startswith("web-")
        first.push_frame(np.full((6, 8, 4), 200, np.uint8)[..., :3])
        first.push_audio(to_mono_float(np.zeros((800, 2), np.int16)), 16000)
        assert first.frames_sent == 1 and first.audio_sent_s == pytest.approx(0.05)
        on_watch("tell me when a person enters", first)
        assert list(first.watches.values()) == ["tell me when a person enters"]
        with pytest.raises(gr.Error, match="Type a question"):
            next(on_ask("  ", first))
        with pytest.raises(ClientError, match=r"\[invalid\] Ask.question"):
            first.ask("x" * 2001)
        wait_until(
            lambda: "gateway" in first.stats,
            10,
            "stage stats to reach the session",
            every=lambda: first.wait_for_change(0.2),
            interval=0,
        )
        assert stats_rows(first)[0][0] == "gateway"
        with Client.connect(gateway_and_memory.run_dir, timeout_s=10) as client:
            counters = client.status().stages["gateway"].counters
        assert counters["in_VideoFrame"] == 1 and counters["in_AudioChunk"] == 1 and counters["in_Watch"] == 1
    finally:
        first.close()
        second.close()
    assert not first.reader.is_alive()


def test_page_builds_with_every_control(gateway_and_memory: Launcher) -> None:
    page = build_page(gateway_and_memory.run_dir)
    ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert {
        "camera",
        "mic",
        "question",
        "ask",
        "answer",
        "speaker",
        "watch",
        "alerts",
        "stats",
        "timeline",
    } <= ids


def test_citations_are_highlighted_and_browser_audio_is_normalised() -> None:
    assert highlight_citations("at 02:14 and 1:05, not 3") == "at **02:14** and **1:05**, not 3"
    stereo = np.array([[32767, -32767], [16384, 16384]], np.int16)
    mono = to_mono_float(stereo)
    assert mono.dtype == np.float32 and mono.shape == (2,)
    assert mono[0] == pytest.approx(0.0) and mono[1] == pytest.approx(0.5, abs=1e-3)
    wav = wav_bytes(np.zeros(2400, np.float32), 24000)
    assert wav[:4] == b"RIFF" and len(wav) == 44 + 2 * 2400
