"""A user who only talks: the demo page in headless Chromium under the browser's default autoplay
policy, against every real stage. The fake microphone speaks a question (the packaged TTS voice),
the fake camera plays the bundled sample; the test starts the camera and clicks Record, nothing
else: no typed question, no click on the player. The answer must be written in the conversation
and its speech must play in the page (an analyser on the player's output hears it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.bench.browser import launch_chromium, open_voice_page, round_trips, start_page, stop_page

from ..conftest import make_config
from .media import fake_camera, fake_microphone

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("OMNISTREAM_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts"))
SPOKEN_QUESTION = "What animal is on the screen right now?"
ANSWER_TIMEOUT_MS = 180_000
PLAYER_STATE = """() => {
  const S = window.omniSpeaker;
  const feed = document.querySelector('#speech-feed textarea');
  return S && {state: S.ctx?.state, time: S.ctx?.currentTime, seq: S.lastSeq, gaps: S.gaps, chunks: S.chunks,
               heard: S.heard, scheduled: S.scheduled, feed: feed ? feed.value.length : 'no textarea'};
}"""


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("voice"))
    config = make_config(
        root,
        ("gateway", "perception", "memory", "reasoning", "speech"),
        **{"reasoning.model": "qwen2.5-coder-0.5b"},
    )
    launcher = Launcher(config, Path("/tmp") / f"os-voice-{os.getpid()}")
    launcher.start()
    from omnistream.bench.browser import free_port

    port = free_port()
    page = start_page(launcher.run_dir, port, root / "demo.log")
    try:
        yield f"http://127.0.0.1:{port}", launcher, root
    finally:
        stop_page(page)
        launcher.shutdown()


def test_a_spoken_question_is_answered_aloud_with_no_click_but_record(page_url) -> None:
    from playwright.sync_api import sync_playwright

    url, launcher, root = page_url
    camera = fake_camera(root / "camera.y4m")
    microphone = fake_microphone(root / "microphone.wav", SPOKEN_QUESTION)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, camera, microphone)  # default policy: sound needs a gesture
        try:
            console: list[str] = []
            page = open_voice_page(browser, url, console)
            try:
                page.wait_for_function(
                    "() => Object.keys(window.omniSpeaker.heard).length > 0", timeout=ANSWER_TIMEOUT_MS
                )
            except PlaywrightTimeout as exc:
                with Client.connect(launcher.run_dir, timeout_s=20) as client:
                    stages = client.status().stages
                raise AssertionError(
                    f"no spoken answer played: speech {dict(stages['speech'].counters)}, player "
                    f"{page.evaluate(PLAYER_STATE)}, console {console[-10:]}, page heard "
                    f"{page.locator('#heard').inner_text()!r}, conversation "
                    f"{page.locator('#conversation').inner_text()!r}"
                ) from exc
            player = page.evaluate(
                """() => ({state: omniSpeaker.ctx.state, chunks: omniSpeaker.chunks, gaps: omniSpeaker.gaps,
                           seconds: omniSpeaker.samples / 24000, status: document.querySelector('#speaker').innerText})"""
            )
            # the context runs (Record unlocked it), whole chunks came with none lost on the way
            assert player["state"] == "running" and player["chunks"] >= 5 and player["gaps"] == 0, player
            page.wait_for_function(
                "() => (document.querySelector('#conversation')?.textContent || '').includes('first token')",
                timeout=ANSWER_TIMEOUT_MS,
            )
            conversation = page.locator("#conversation").inner_text()
            assert conversation.lstrip().startswith("🎤"), conversation  # a spoken turn, none typed
            question_line, _, answer = conversation.partition("\n")
            # whisper tiny.en heard "What an animal is", "And what is", "What handle is" ... "on the screen"
            assert "screen" in question_line.lower(), conversation
            words = answer.split("first token")[0].strip()
            assert len(words) > 3 and "▌" not in answer, conversation
            # the answer was heard after the question ended, in the same page's clock
            trips, _ = round_trips(page)
            assert trips and all(0 < t < 120 for t in trips), trips
            print(f"end of the spoken question -> first answer audio playing: {trips[0] * 1000:.0f} ms")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo-voice-only.png"), full_page=True)
            page.close()
        finally:
            browser.close()
