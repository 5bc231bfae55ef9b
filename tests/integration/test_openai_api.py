"""The OpenAI-compatible API over the real system (every stage, the default models) after a
replay of the bundled 30 s recording (a monarch butterfly while a reader says "He might even
have been made amiable himself."): the official ``openai`` client asks whole and streamed, curl
streams the chunks, /v1/models lists the running LLM, /v1/events carries the transcripts as
they are heard. One system per module; the API is served by uvicorn with a bearer token.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.models import prepare_llm_cache
from omnistream.app.openai_api import ApiThread, create_app
from omnistream.app.replay import DEFAULT_SAMPLE, Replayer

from ..conftest import make_config, pid_alive
from ..util import wait_until

pytestmark = pytest.mark.slow

SESSION = "api-replay"
TOKEN = "integration-token-0123456789"
CITATION = re.compile(r"\[(\d\d):(\d\d)(?:-(\d\d):(\d\d))?\]")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Events(threading.Thread):
    """Reads /v1/events (transcripts) into ``events`` until the stream ends or ``stop`` is set."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.events: list[tuple[str, dict]] = []
        self.opened = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        params = {"session": SESSION, "types": "transcript"}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.stream("GET", self.url, params=params, headers=headers, timeout=None) as response:
            self.opened.set()
            name = ""
            for line in response.iter_lines():  # a keep-alive comment at least every 15 s
                if self.stop.is_set():
                    return
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line.removeprefix("data: "))))


@dataclass
class System:
    base: str  # the API's base URL (".../v1")
    launcher: Launcher
    events: Events  # what /v1/events sent during the replay


@pytest.fixture(scope="module")
def api():
    root = Path(tempfile.mkdtemp(prefix="os-api-it-", dir="/tmp"))
    config = make_config(root, ("gateway", "perception", "memory", "reasoning", "speech"))
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, root / "run")
    launcher.start()
    supervisor = launcher.supervise_in_thread()
    port = free_port()
    server = ApiThread(create_app(launcher.run_dir, token=TOKEN, session=SESSION), "127.0.0.1", port)
    server.start()
    base = f"http://127.0.0.1:{port}/v1"
    events = Events(f"{base}/events")
    events.start()
    assert events.opened.wait(30), "the events stream did not open"
    with Client.connect(launcher.run_dir, session=SESSION) as client:
        Replayer(client, speak=False).run(DEFAULT_SAMPLE, [], speed=3.0)
        wait_until(  # the end of the sound is transcribed after the replay
            lambda: any("amiable" in i.text.lower() for i in client.history(kinds=["transcript"]).items),
            90,
            "the reader's words to reach memory",
            interval=1.0,
        )
    events.stop.set()
    yield System(base, launcher, events)
    server.stop()
    pids = [c.pid for c in launcher.children.values()]
    supervisor.stop()
    assert not any(pid_alive(pid) for pid in pids), "a stage outlived the shutdown"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def openai_client(api: System) -> OpenAI:
    return OpenAI(base_url=api.base, api_key=TOKEN, max_retries=0, timeout=240)


def check_citations(text: str) -> None:
    """The answer ends with the stream times it came from, all within the 30 s recording."""
    assert "\n\nSources: [" in text, text
    spans = CITATION.findall(text.split("\n\nSources: ")[-1])
    assert spans, text
    for m0, s0, m1, s1 in spans:
        assert int(m0) * 60 + int(s0) <= 32 and (not m1 or int(m1) * 60 + int(s1) <= 32), text


def test_models_lists_the_running_llm_and_a_wrong_key_is_refused(api: System, openai_client: OpenAI) -> None:
    ids = [model.id for model in openai_client.models.list()]
    assert ids == ["omnistream", api.launcher.config.reasoning.model]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=api.base, api_key="wrong-token-0123456789", max_retries=0).models.list()


def test_the_openai_client_gets_whole_and_streamed_answers_about_the_stream(openai_client: OpenAI) -> None:
    whole = openai_client.chat.completions.create(
        model="omnistream",
        messages=[{"role": "user", "content": "What did the reader say he might even have been made?"}],
        user=SESSION,
    )
    text = whole.choices[0].message.content or ""
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "stop"
    assert "amiable" in text.lower(), text
    check_citations(text)
    assert whole.usage is not None and whole.usage.completion_tokens > 3

    started = time.monotonic()
    first_token_s = None
    pieces = []
    stream = openai_client.chat.completions.create(
        model="omnistream",
        messages=[{"role": "user", "content": "Which animal was on screen?"}],
        user=SESSION,
        stream=True,
    )
    finishes = []
    for piece in stream:
        assert piece.object == "chat.completion.chunk"
        delta = piece.choices[0].delta.content
        if delta:
            first_token_s = first_token_s or time.monotonic() - started
            pieces.append(delta)
        finishes.append(piece.choices[0].finish_reason)
    answer = "".join(pieces)
    assert len(pieces) > 3 and finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert "butterfly" in answer.lower(), answer
    check_citations(answer)
    print(f"\nfirst token via the API (openai client, streamed): {first_token_s:.2f} s")


def test_curl_streams_openai_chunks_ending_in_done(api: System) -> None:
    base, launcher = api.base, api.launcher
    curl = shutil.which("curl")
    assert curl, "curl is needed"
    body = {
        "model": launcher.config.reasoning.model,
        "messages": [{"role": "user", "content": "Which animal was on screen?"}],
        "stream": True,
    }
    result = subprocess.run(
        [curl, "-sS", "-N", f"{base}/chat/completions", "-H", f"Authorization: Bearer {TOKEN}",
         "-H", "Content-Type: application/json", "-H", f"X-Omnistream-Session: {SESSION}",
         "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines), result.stdout[:500]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == body["model"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "butterfly" in text.lower(), text
    check_citations(text)

    # The same question through the Python client (what `omnistream ask` uses): first-token times.
    with Client.connect(launcher.run_dir, session=SESSION) as client:
        started = time.monotonic()
        first = None
        for _ in client.ask("Which animal was on screen?", timeout_s=240):
            first = first or time.monotonic() - started
    print(f"\nfirst token via the ZeroMQ client (omnistream ask): {first:.2f} s")


def test_events_carried_the_transcripts_as_they_were_heard(api: System) -> None:
    transcripts = [data for name, data in api.events.events if name == "transcript"]
    assert transcripts, api.events.events
    assert all(t["session"] == SESSION and t["type"] == "Transcript" and t["final"] for t in transcripts)
    heard = " ".join(t["text"] for t in transcripts).lower()
    assert "amiable" in heard, heard
    assert all(re.fullmatch(r"\d\d:\d\d", t["at"]) for t in transcripts)
