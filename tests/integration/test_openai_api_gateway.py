"""The OpenAI-compatible API (app/openai_api.py) against a real launcher and gateway process:
what a client of the API sees before and around the answering, which needs no model.

Bearer tokens (401 in OpenAI's error shape without one, when one is set; none needed on
loopback; no serving beyond loopback without one), requests refused with 400s that name the
problem, a failed answer (the gateway's own timeout: nothing answers here) as an OpenAI error
whole and streamed, and a client hanging up mid-stream interrupting its question, served by
uvicorn. Real answers (the default models on a recording, the official ``openai`` client and
curl) are in tests/integration/test_openai_api.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.openai_api import (
    MAX_BODY_BYTES,
    TOKEN_ENV,
    ApiSecurityError,
    ApiThread,
    check_bind,
    chunk,
    citations,
    create_app,
    read_token,
    sse,
)
from omnistream.protocol.messages import Interrupt

from ..conftest import make_config
from ..util import wait_until

TOKEN = "s3cret-token-0123456789"
ASK_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def system():
    """A gateway alone: questions are accepted, and fail after ASK_TIMEOUT_S without an answer."""
    root = Path(tempfile.mkdtemp(prefix="os-api-", dir="/tmp"))
    config = make_config(root, ("gateway",), **{"gateway.ask_timeout_s": ASK_TIMEOUT_S})
    launcher = Launcher(config, root / "run")
    launcher.start()
    supervisor = launcher.supervise_in_thread()
    yield launcher
    supervisor.stop()
    shutil.rmtree(root, ignore_errors=True)


def sse_chunks(body: str) -> list:
    """The ``data:`` payloads of an SSE body, in order ("[DONE]" as the string)."""
    out = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_no_serving_beyond_loopback_without_a_token_and_tokens_come_from_files_or_the_environment(
    tmp_path: Path, monkeypatch
) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    with pytest.raises(ApiSecurityError, match=r"--host 0.0.0.0 serves the API beyond this machine"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", TOKEN)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert read_token(None) == TOKEN
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file-0123456789\n")
    token_file.chmod(0o600)
    assert read_token(token_file) == "from-the-file-0123456789"  # the file wins over the environment
    token_file.chmod(0o644)
    with pytest.raises(ApiSecurityError, match=r"readable by others .*chmod 600"):
        read_token(token_file)
    token_file.write_text("short")
    token_file.chmod(0o600)
    with pytest.raises(ApiSecurityError, match=r"at least 16 characters"):
        read_token(token_file)
    with pytest.raises(ApiSecurityError, match=r"cannot read the API token file"):
        read_token(tmp_path / "missing")


def test_citations_are_the_stream_times_the_answer_came_from() -> None:
    assert (
        citations([[12.0, 20.4], [41.0, 41.2], [3700.0, 3725.0]]) == "[00:12-00:20] [00:41] [1:01:40-1:02:05]"
    )
    assert (
        citations([[float(t), float(t)] for t in range(0, 100, 10)], limit=3) == "... [01:10] [01:20] [01:30]"
    )
    assert citations([]) == ""


def test_chunks_are_openai_server_sent_events() -> None:
    base = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": "omnistream"}
    assert sse(chunk(base, {"content": "a cup at 00:41"})) == (
        b'data: {"id":"chatcmpl-t","object":"chat.completion.chunk","created":1,"model":"omnistream",'
        b'"choices":[{"index":0,"delta":{"content":"a cup at 00:41"},"logprobs":null,"finish_reason":null}]}\n\n'
    )
    assert sse({"text": "café"}, "alert") == 'event: alert\ndata: {"text":"café"}\n\n'.encode()
    assert sse_chunks(sse(chunk(base, {}, "stop")).decode() + "data: [DONE]\n\n")[-1] == "[DONE]"


def test_a_token_guards_every_endpoint_with_openai_shaped_401s(system: Launcher) -> None:
    with TestClient(create_app(system.run_dir, token=TOKEN)) as http:
        for method, path in (("get", "/v1/models"), ("post", "/v1/chat/completions"), ("get", "/v1/events")):
            response = getattr(http, method)(path)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API token"
        right = http.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
    ids = [m["id"] for m in right.json()["data"]]
    # "omnistream" and the running system's LLM (from its run directory's config)
    assert right.json()["object"] == "list" and ids == ["omnistream", system.config.reasoning.model]


def test_bad_requests_get_400s_that_name_the_problem(system: Launcher) -> None:
    def ask(body, **headers):
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        return http.post("/v1/chat/completions", content=data, headers=headers)

    user = {"role": "user", "content": "What is on screen?"}
    with TestClient(create_app(system.run_dir)) as http:  # loopback, no token: open
        assert http.get("/v1/models").status_code == 200
        cases = [
            (ask("{not json"), 400, "not valid JSON"),
            (ask([user]), 400, "must be a JSON object"),
            (ask({"model": "omnistream"}), 400, "messages must be a non-empty list"),
            (ask({"messages": [{"role": "system", "content": "Be brief."}]}), 400, "has no user message"),
            (ask({"messages": [{"role": "user", "content": "  "}]}), 400, "messages[0].content is empty"),
            (
                ask({"messages": [{"role": "user", "content": "x" * 2001}]}),
                400,
                "2001 characters; at most 2000",
            ),
            (
                ask(
                    {
                        "messages": [
                            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                        ]
                    }
                ),
                400,
                "'image_url' part: only text is supported",
            ),
            (ask({"messages": [user], "user": "../etc"}), 400, "user '../etc' is not a session name"),
            (
                ask({"messages": [user]}, **{"X-Omnistream-Session": "a/b"}),
                400,
                "X-Omnistream-Session header 'a/b' is not a session name",
            ),
            (ask({"messages": [user], "stream": "yes"}), 400, "stream must be true or false"),
            (ask({"messages": [user], "stream_time": -1}), 400, "stream_time must be a number"),
            (ask({"messages": [user], "model": "gpt-4o"}), 404, "the model 'gpt-4o' does not exist"),
            (ask(json.dumps({"messages": [user], "pad": "x" * MAX_BODY_BYTES})), 400, "at most 262144"),
            (http.get("/v1/events", params={"types": "alert,gossip"}), 400, "unknown event type 'gossip'"),
            (http.get("/v1/events", params={"session": ".."}), 400, "session '..' is not a session name"),
            (http.get("/v1/nothing"), 404, "Not Found"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, (message, response.text)
            error = response.json()["error"]
            assert message in error["message"], (message, error)
            assert set(error) == {"message", "type", "param", "code"}
        assert cases[6][0].json()["error"]["param"] == "messages[0].content"
        assert cases[11][0].json()["error"]["code"] == "model_not_found"


def test_a_failed_answer_is_an_openai_error_whole_and_streamed(system: Launcher) -> None:
    """Nothing answers in this system: the gateway fails the question after its ask timeout,
    and the API says so, as a 502 or as an error event after the role chunk."""
    question = {"messages": [{"role": "user", "content": "Is anyone there?"}], "user": "api-unit"}
    with TestClient(create_app(system.run_dir)) as http:
        start = time.monotonic()
        whole = http.post("/v1/chat/completions", json=question)
        assert time.monotonic() - start < ASK_TIMEOUT_S + 10
        with http.stream("POST", "/v1/chat/completions", json={**question, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = sse_chunks("".join(response.iter_text()))
    assert whole.status_code == 502, whole.text
    assert whole.json()["error"]["type"] == "server_error"
    assert "answer failed: no answer progress within 3 s" in whole.json()["error"]["message"]
    first, error = chunks
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "no answer progress within 3 s" in error["error"]["message"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hanging_up_mid_stream_interrupts_the_question(system: Launcher) -> None:
    port = free_port()
    api = ApiThread(create_app(system.run_dir, token=TOKEN), "127.0.0.1", port)
    api.start()
    try:
        with Client.connect(system.run_dir, timeout_s=10) as watcher:
            with httpx.stream(
                "POST",
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=10,
            ) as response:
                line = next(response.iter_lines())
                turn = json.loads(line.removeprefix("data: "))["id"].removeprefix("chatcmpl-")
            # the connection is closed: the API interrupts the question at once
            interrupts = [
                e
                for e in watcher.subscribe(Interrupt, timeout_s=ASK_TIMEOUT_S - 1)
                if isinstance(e, Interrupt) and e.turn == turn
            ]
    finally:
        api.stop()
    assert interrupts and interrupts[0].reason == "client", turn
    assert not api.thread.is_alive()


def test_events_stream_a_sessions_answers_alerts_and_transcripts(system: Launcher) -> None:
    """/v1/events with types=answer: the gateway's own AnswerDone for a question that failed
    (nothing answers here), with all its fields and its stream time as cited; other sessions'
    events are not sent."""
    port = free_port()
    api = ApiThread(create_app(system.run_dir), "127.0.0.1", port)
    api.start()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with httpx.stream(
            "GET", f"{url}/events", params={"session": "watched", "types": "answer,alert"}, timeout=30
        ) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            lines = events.iter_lines()
            assert next(lines) == ": connected"
            for session in ("other", "watched"):
                question = {"messages": [{"role": "user", "content": "Anyone?"}], "user": session}
                failed = httpx.post(f"{url}/chat/completions", json=question, timeout=30)
                assert failed.status_code == 502
            message = failed.json()["error"]["message"]
            received = [line for _, line in zip(range(2), filter(None, lines), strict=False)]
    finally:
        api.stop()
    assert received[0] == "event: answer", received
    done = json.loads(received[1].removeprefix("data: "))
    assert done["type"] == "AnswerDone" and done["session"] == "watched", done
    assert done["error"].startswith("no answer progress within 3 s") and done["error"] in message
    assert done["choice"] == "" and done["context"] == [] and done["at"] == "00:00"


def test_serve_api_attaches_to_the_running_system_and_refuses_to_serve_beyond_loopback_without_a_token(
    system: Launcher, tmp_path: Path, monkeypatch, capsys
) -> None:
    from omnistream.app.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as refused:
        main(["serve-api", "--host", "0.0.0.0", "--run-dir", str(system.run_dir)])
    assert refused.value.code == 2
    assert "serves the API beyond this machine" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(SystemExit) as missing:
        main(["serve-api", "--run-dir", str(tmp_path)])
    assert missing.value.code == 3 and "no omnistream running" in capsys.readouterr().err

    port = free_port()
    command = [str(Path(sys.executable).with_name("omnistream")), "serve-api", "--json"]
    command += ["--run-dir", str(system.run_dir), "--port", str(port), "--session", "from-cli"]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, TOKEN_ENV: TOKEN},  # the token from the environment, never argv
    )
    try:
        announced = json.loads(server.stdout.readline())
        assert announced == {"url": f"http://127.0.0.1:{port}/v1", "session": "from-cli", "token": True}

        def models_served() -> httpx.Response | None:
            assert server.poll() is None, server.stderr.read()
            try:
                return httpx.get(f"{announced['url']}/models", headers={"Authorization": f"Bearer {TOKEN}"})
            except httpx.ConnectError:
                return None

        models = wait_until(models_served, 20, "the API to serve /models", interval=0.2)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "omnistream"
        assert httpx.get(f"{announced['url']}/models").status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=20)
    # uvicorn shuts down cleanly, then re-raises the signal it caught
    errors = server.stderr.read()
    assert server.returncode == -signal.SIGTERM and "Traceback" not in errors, errors


def test_up_with_api_serves_it_alongside_the_system(short_tmp: Path) -> None:
    port = free_port()
    command = [str(Path(sys.executable).with_name("omnistream")), "up", "--api", "--json"]
    command += ["--run-dir", str(short_tmp / "run"), "--set", 'stages=["gateway"]']
    command += ["--set", f"paths.data_dir={short_tmp / 'data'}", "--set", f"api.port={port}"]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        rows = json.loads(up.stdout.readline())  # printed once the stages and the API are up
        assert [row["stage"] for row in rows] == ["bus", "gateway"]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "omnistream"
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
    assert up.returncode in (0, 130), up.stderr.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    refused = subprocess.run(
        [*command[:2], "--api", "--set", "api.host=0.0.0.0", "--run-dir", str(short_tmp / "run2")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "beyond this machine" in refused.stderr.replace("\n", " ")
    assert not (short_tmp / "run2" / "launcher.pid").exists()  # refused before anything started
