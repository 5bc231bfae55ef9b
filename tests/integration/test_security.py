"""Security: loopback by default, CURVE keys beyond it (unauthorised clients get nothing), size
limits, owner-only files, no pickle/eval of received data, the demo page's password rule."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from omnistream.app.client import Client, ClientError
from omnistream.app.demo import DemoSecurityError, demo_auth
from omnistream.app.launcher import Launcher, LaunchError
from omnistream.protocol.messages import AudioChunk, Status, StatusRequest
from omnistream.protocol.security import generate_keys, is_loopback, load_server_keys, write_keypair
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

from ..conftest import make_config
from ..unit.test_hardening import probe_runtime  # noqa: F401 - the fixture
from ..util import wait_until

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("protocol", "app", "memory", "reasoning", "speech", "perception", "kernels")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_loopback_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("127.3.4.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    default = make_config(Path("/tmp/x"), ("gateway",))
    assert default.gateway.host == "127.0.0.1" and default.bus.host == "127.0.0.1"
    addresses = Addresses.for_run_dir(Path("/tmp/r"))  # internal sockets: owner-only ipc paths
    assert all(getattr(addresses, n).startswith("ipc:///tmp/r/") for n in ("gateway", "bus_in", "memory"))
    assert not addresses.curve
    with pytest.raises(ValueError, match="bus.host '0.0.0.0' is not loopback"):
        Addresses.for_run_dir(Path("/tmp/r"), "tcp", host="0.0.0.0")
    remote = Addresses.for_run_dir(Path("/tmp/r"), "ipc", gateway_host="0.0.0.0", gateway_port=5000)
    assert (
        remote.curve and remote.gateway == "tcp://0.0.0.0:5000" and remote.gateway_pub == "tcp://0.0.0.0:5001"
    )
    assert remote.bus_in.startswith("ipc://")  # the stages stay on this machine


def test_keys_are_owner_only_and_loadable(short_tmp: Path) -> None:
    keys_dir = short_tmp / "keys"
    paths = generate_keys(keys_dir, client="laptop")
    assert mode(keys_dir) == 0o700 and mode(keys_dir / "authorized_clients") == 0o700
    for path in paths.values():
        assert mode(path) == 0o600, path
    public, secret = zmq.auth.load_certificate(str(paths["client_secret"]))
    assert len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(str(paths["authorized"]))[0] == public
    server = load_server_keys(keys_dir)
    assert server.authorized == 1
    # A second client keeps the server pair.
    generate_keys(keys_dir, client="phone")
    assert load_server_keys(keys_dir).public == server.public and load_server_keys(keys_dir).authorized == 2
    with pytest.raises(Exception, match="reserved"):
        generate_keys(keys_dir, client="server")
    os.chmod(paths["server_secret"], 0o644)
    with pytest.raises(Exception, match="readable by others"):
        load_server_keys(keys_dir)


def test_keys_command_never_prints_secrets(short_tmp: Path) -> None:
    keys_dir = short_tmp / "k"
    result = subprocess.run(
        [sys.executable, "-m", "omnistream.app.cli", "keys", "--dir", str(keys_dir), "--client", "ci"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ci.key_secret" in result.stderr
    for name in ("server.key_secret", "ci.key_secret"):
        _, secret = zmq.auth.load_certificate(str(keys_dir / name))
        assert secret.decode() not in result.stdout + result.stderr


def test_gateway_beyond_loopback_refuses_to_start_without_keys(short_tmp: Path) -> None:
    config = make_config(
        short_tmp, ("gateway",), **{"gateway.host": "0.0.0.0", "gateway.keys_dir": str(short_tmp / "none")}
    )
    with pytest.raises(LaunchError, match=r"not loopback.*CURVE keys.*omnistream keys"):
        Launcher(config, short_tmp / "run").start()
    assert not (short_tmp / "run" / "addresses.json").exists()
    # Keys but no authorised client: refused too.
    keys_dir = short_tmp / "half"
    write_keypair(keys_dir, "server")
    config = make_config(
        short_tmp, ("gateway",), **{"gateway.host": "0.0.0.0", "gateway.keys_dir": str(keys_dir)}
    )
    with pytest.raises(LaunchError, match="no authorised client keys"):
        Launcher(config, short_tmp / "run").start()
    config = make_config(short_tmp, ("gateway",), **{"bus.transport": "tcp", "bus.host": "0.0.0.0"})
    with pytest.raises(LaunchError, match="bus.host"):
        Launcher(config, short_tmp / "run").start()


def _raw_status(endpoint: str, setup=None, wait_ms: int = 3000) -> object | None:
    """One StatusRequest on a fresh DEALER; the reply, or None if nothing came."""
    sock = make_socket(zmq.Context.instance(), zmq.DEALER)
    try:
        if setup:
            setup(sock)
        sock.connect(endpoint)
        send(sock, StatusRequest(request_id="probe"))
        if not sock.poll(wait_ms):
            return None
        return recv(sock)[1]
    finally:
        sock.close(linger=0)


def test_only_authorised_clients_reach_a_gateway_beyond_loopback(curve_gateway) -> None:
    launcher, keys_dir, port = curve_gateway("good")
    addresses = json.loads((launcher.run_dir / "addresses.json").read_text())
    assert addresses["gateway"] == f"tcp://0.0.0.0:{port}" and addresses["curve"] is True
    endpoint = f"tcp://127.0.0.1:{port}"

    # The authorised key: served, over the run directory's addresses and over an explicit endpoint.
    with Client.connect(launcher.run_dir, timeout_s=20, keys_dir=keys_dir, key_name="good") as client:
        launcher.step()
        assert isinstance(client.status(), Status)
    with Client.connect(endpoint=endpoint, keys_dir=keys_dir, key_name="good", timeout_s=20) as client:
        assert "gateway" in client.status().stages

    # No keys at all: the client refuses up front; a plain (NULL) socket gets no answer.
    with pytest.raises(ClientError, match="requires CURVE keys"):
        Client.connect(launcher.run_dir, timeout_s=3, keys_dir=keys_dir / "nowhere")
    assert _raw_status(endpoint) is None

    # A well-formed key pair that is not authorised: the gateway's ZAP handler refuses it.
    stranger = keys_dir.parent / "stranger"
    write_keypair(stranger, "client")
    (stranger / "server.key").write_text((keys_dir / "server.key").read_text())
    with pytest.raises(ClientError, match="unreachable|no reply"):
        Client.connect(endpoint=endpoint, keys_dir=stranger, timeout_s=3)

    # The authorised key against a server key that is not the gateway's: no handshake.
    def wrong_server(sock: zmq.Socket) -> None:
        public, secret = zmq.auth.load_certificate(str(keys_dir / "good.key_secret"))
        sock.curve_serverkey = zmq.curve_keypair()[0]
        sock.curve_publickey, sock.curve_secretkey = public, secret

    assert _raw_status(endpoint, wrong_server) is None

    def authorised(sock: zmq.Socket) -> None:
        public, secret = zmq.auth.load_certificate(str(keys_dir / "good.key_secret"))
        sock.curve_serverkey = zmq.auth.load_certificate(str(keys_dir / "server.key"))[0]
        sock.curve_publickey, sock.curve_secretkey = public, secret

    assert isinstance(_raw_status(endpoint, authorised), Status)
    # The PUB side is CURVE too: a plain SUB receives nothing.
    sub = make_socket(zmq.Context.instance(), zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port + 1}")
    try:
        for _ in range(10):
            launcher.step(timeout_ms=200)
        assert not sub.poll(500)
    finally:
        sub.close(linger=0)
    assert launcher.children["gateway"].restarts == 0


def test_oversized_message_is_cut_off_and_the_gateway_keeps_serving(short_tmp: Path) -> None:
    config = make_config(short_tmp, ("gateway",), **{"bus.max_message_bytes": 1 << 20})
    launcher = Launcher(config, short_tmp / "run")
    launcher.start()
    try:
        addresses = Addresses.load(launcher.run_dir)
        sock = make_socket(zmq.Context.instance(), zmq.DEALER, max_message_bytes=64 << 20)
        sock.connect(addresses.gateway)
        try:
            sock.send_multipart([b"VideoFrame", b"\x80", b"\0" * (2 << 20)])
            send(sock, StatusRequest(request_id="after-big"))
            # ZeroMQ cut the connection at the size limit (the big frame never reached the
            # decoder: no Error for it); the DEALER reconnects and the status request is served.
            assert sock.poll(10_000)
            reply = recv(sock)[1]
            assert isinstance(reply, Status), reply
            assert reply.stages["gateway"].counters.get("rejected", 0) == 0
        finally:
            sock.close(linger=0)
        reply = _raw_status(addresses.gateway, wait_ms=10_000)
        assert isinstance(reply, Status)
        assert launcher.children["gateway"].alive() and launcher.children["gateway"].restarts == 0
    finally:
        launcher.shutdown()


def test_run_files_are_owner_only(short_tmp: Path) -> None:
    launcher = Launcher(make_config(short_tmp, ("gateway",)), short_tmp / "run")
    launcher.start()
    try:
        run_dir = launcher.run_dir
        assert mode(run_dir) == 0o700 and mode(run_dir / "logs") == 0o700
        assert mode(launcher.config.data_dir) == 0o700
        files = [p for p in run_dir.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"config.json", "addresses.json", "launcher.pid", "gateway.log"}
        for path in files:
            assert mode(path) & 0o077 == 0, f"{path} is mode {mode(path):o}"
        for path in run_dir.iterdir():
            if path.is_socket():
                assert mode(run_dir) == 0o700  # sockets live only in the owner-only directory
    finally:
        launcher.shutdown()


def _sources() -> list[Path]:
    return [p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py")]


def test_no_pickle_eval_or_exec_of_received_data() -> None:
    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
    banned_calls = {"eval", "exec", "recv_pyobj", "send_pyobj", "recv_serialized", "loads_pickle"}
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                if any(n.split(".")[0] in banned_modules for n in names):
                    problems.append(f"{path}:{node.lineno} imports {names}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else ""
                )
                if name in banned_calls and not (name == "eval" and isinstance(func, ast.Attribute)):
                    problems.append(f"{path}:{node.lineno} calls {name}")
                if name == "load" and any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords
                ):
                    problems.append(f"{path}:{node.lineno} torch.load(weights_only=False)")
    assert not problems, problems


def test_every_socket_has_size_limits() -> None:
    """Sockets are made only by ``make_socket``, which sets MAXMSGSIZE and high-water marks."""
    offenders = []
    for path in _sources():
        if path.name == "sockets.py" and path.parent.name == "protocol":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "socket"
            ):
                receiver = node.func.value
                if isinstance(receiver, ast.Name) and receiver.id == "socket":
                    continue  # the stdlib's socket.socket (free ports), not ZeroMQ
                offenders.append(f"{path}:{node.lineno}")
    assert not offenders, offenders
    sock = make_socket(zmq.Context.instance(), zmq.DEALER, max_message_bytes=12345, hwm=7)
    try:
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 12345 and sock.getsockopt(zmq.RCVHWM) == 7
    finally:
        sock.close(linger=0)


def test_demo_page_needs_a_password_beyond_loopback_or_to_share() -> None:
    assert demo_auth("127.0.0.1", "", share=False) is None
    with pytest.raises(DemoSecurityError, match="--password"):
        demo_auth("0.0.0.0", "", share=False)
    with pytest.raises(DemoSecurityError, match="--share"):
        demo_auth("127.0.0.1", "", share=True)
    with pytest.raises(DemoSecurityError, match="at least 8"):
        demo_auth("0.0.0.0", "short", share=False)
    assert demo_auth("0.0.0.0", "correct horse", share=False) == ("omnistream", "correct horse")


def test_demo_cli_refuses_to_serve_beyond_loopback_without_password(short_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMNISTREAM_DEMO_PASSWORD"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnistream.app.cli",
            "demo",
            "--host",
            "0.0.0.0",
            "--run-dir",
            str(short_tmp / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2 and "--password" in result.stderr
    assert not (short_tmp / "r").exists()  # refused before starting anything


# -- issue #18 item 4: the bus and a stage's receive step are bounded --------------------------------


@pytest.mark.parametrize("probe_runtime", [{"bus.poll_max_bytes": 1 << 20}], indirect=True)
def test_poll_takes_at_most_poll_max_bytes_and_leaves_the_rest_queued(probe_runtime) -> None:  # noqa: F811
    """Ten 300 kB audio chunks wait in the SUB socket: one poll takes four (1.2 MB, the first
    to pass 1 MB), the rest wait for the next polls, in order."""
    runtime = probe_runtime
    bus_out = make_socket(zmq.Context.instance(), zmq.PUB, hwm=10_000)
    bus_out.bind(runtime.addresses.bus_out)
    runtime.subscribe(AudioChunk)
    chunk = np.zeros(75_000, np.float32)  # 300 kB
    try:
        wait_until(  # the subscription has reached the publisher
            lambda: runtime.poll(0.05),
            10,
            "the subscription to reach the publisher",
            every=lambda: send(bus_out, AudioChunk(pcm=np.zeros(16, np.float32), ts=-1.0)),
            interval=0,
        )
        time.sleep(0.2)
        runtime.poll(0.0)
        runtime.take_pending()
        for i in range(10):
            send(bus_out, AudioChunk(pcm=chunk, ts=float(i)))
        time.sleep(0.5)
        sizes, got = [], []

        def take() -> None:
            batch = runtime.poll(0.1)
            sizes.append(len(batch))
            got.extend(batch)

        wait_until(
            lambda: len(got) >= 10, 10, lambda: f"ten chunks; batches: {sizes}", every=take, interval=0
        )
        assert sizes[:3] == [4, 4, 2], sizes
        assert [m.ts for m in got] == [float(i) for i in range(10)]
        assert runtime.counters["poll_byte_limit"] >= 2
    finally:
        bus_out.close(linger=0)


def test_the_bus_queues_at_most_hwm_messages_for_a_subscriber_that_stops_reading(short_tmp: Path) -> None:
    """The real bus process with ``bus.hwm`` 500: 5000 messages of 8 kB published to a
    subscriber that reads none; it finds at most its own and the bus's queue (2 x 500, plus what
    the kernel's socket buffers hold), not all 5000 (the bus queued 100 000)."""
    launcher = Launcher(make_config(short_tmp, ("gateway",), **{"bus.hwm": 500}), short_tmp / "run")
    launcher.start()
    ctx = zmq.Context.instance()
    sub = make_socket(ctx, zmq.SUB, hwm=500)
    pub = make_socket(ctx, zmq.PUB, hwm=100_000)
    try:
        sub.connect(launcher.addresses.bus_out)
        sub.setsockopt(zmq.SUBSCRIBE, b"Flood")
        pub.connect(launcher.addresses.bus_in)
        wait_until(  # the subscription has reached the bus
            lambda: sub.poll(50),
            10,
            "the subscription to reach the bus",
            every=lambda: pub.send_multipart([b"Flood", b"probe"]),
            interval=0,
        )
        while sub.poll(200):
            sub.recv_multipart()
        body = b"x" * 8192
        for i in range(5000):
            pub.send_multipart([b"Flood", str(i).encode(), body])
        time.sleep(2.0)  # the bus forwarded what it could; the subscriber read nothing so far
        received = 0
        while sub.poll(500):
            sub.recv_multipart()
            received += 1
        assert 400 <= received <= 1300, received
    finally:
        sub.close(linger=0)
        pub.close(linger=0)
        launcher.shutdown()


# -- issue #18, low-severity items -----------------------------------------------------------------


def test_bus_transport_tcp_is_refused(short_tmp: Path) -> None:
    """tcp ports on loopback would open the bus, memory and control sockets to every local
    user, unauthenticated: refused before anything starts."""
    config = make_config(short_tmp, ("gateway",), **{"bus.transport": "tcp"})
    with pytest.raises(LaunchError, match=r"bus.transport 'tcp'.*every local user.*use 'ipc'"):
        Launcher(config, short_tmp / "run").start()
    assert not (short_tmp / "run" / "addresses.json").exists()
    with pytest.raises(ValueError, match="bus.transport 'tcp'"):
        Addresses.for_run_dir(short_tmp, "tcp")


def test_demo_password_comes_from_a_file_or_the_environment_never_the_command_line(
    short_tmp: Path, monkeypatch
) -> None:
    from omnistream.app.demo import demo_password

    env = {k: v for k, v in os.environ.items() if k != "OMNISTREAM_DEMO_PASSWORD"}
    result = subprocess.run(
        [sys.executable, "-m", "omnistream.app.cli", "demo", "--password", "hunter2hunter2"]
        + ["--host", "0.0.0.0", "--run-dir", str(short_tmp / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2 and "--password-file" in result.stdout + result.stderr, result
    assert "hunter2hunter2" not in result.stdout + result.stderr
    assert not (short_tmp / "r").exists()  # refused before starting anything
    secret = short_tmp / "pw"
    secret.write_text("correct horse battery\n")
    secret.chmod(0o600)
    assert demo_password(str(secret)) == "correct horse battery"
    secret.chmod(0o640)
    with pytest.raises(DemoSecurityError, match="other users.*chmod 600"):
        demo_password(str(secret))
    with pytest.raises(DemoSecurityError, match="cannot read"):
        demo_password(str(short_tmp / "missing"))
    monkeypatch.setenv("OMNISTREAM_DEMO_PASSWORD", "from the environment")
    assert demo_password(None) == "from the environment"


def test_a_prime_sample_rate_is_refused_before_it_builds_a_huge_filter() -> None:
    from omnistream.app.gateway import check_request
    from omnistream.protocol.config import GatewayConfig
    from omnistream.protocol.messages import AudioChunk
    from omnistream.speech.rates import sample_rate_problem
    from omnistream.speech.resample import to_mono_float

    chunk = AudioChunk(pcm=np.zeros(441, np.float32), sample_rate=44101)
    problem = check_request(chunk, GatewayConfig())
    assert problem and "44101 Hz" in problem and "882020-tap" in problem, problem
    for usual in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000, 192000):
        assert sample_rate_problem(usual) is None
        assert (
            check_request(AudioChunk(pcm=np.zeros(160, np.float32), sample_rate=usual), GatewayConfig())
            is None
        )
    start = time.monotonic()
    with pytest.raises(ValueError, match="tap resampling filter"):
        to_mono_float(np.zeros(441, np.float32), 44101)  # what the speech stage's listener does first
    assert time.monotonic() - start < 1.0


def test_ask_timeout_bounds_the_wait_for_the_answer(short_tmp: Path) -> None:
    """A gateway with no reasoning accepts the question and nothing answers it: `omnistream ask
    --timeout 3` gives up after about 3 s (it waited 300 s, whatever --timeout said)."""
    config = make_config(short_tmp, ("gateway",), **{"gateway.ask_timeout_s": 600.0})
    launcher = Launcher(config, short_tmp / "run")
    launcher.start()
    try:
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "omnistream.app.cli", "ask", "what is on screen?"]
            + ["--run-dir", str(launcher.run_dir), "--timeout", "3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - start
    finally:
        launcher.shutdown()
    assert result.returncode != 0 and "no complete answer within 3 s" in result.stdout + result.stderr, result
    assert took < 30, took


def test_a_frame_over_the_gateways_limits_is_refused_by_the_client_or_scaled_down(short_tmp: Path) -> None:
    """A 5000 x 5000 frame (75 MB) is over the gateway's socket cap: sent, it cut the client's
    connection. The client refuses it with a clear error, ``fit_frame`` (replay, demo) scales it
    to fit, and the scaled frame goes through on the same connection."""
    from omnistream.app.client_core import MAX_FRAME_BYTES, MAX_FRAME_SIDE, fit_frame
    from omnistream.protocol.config import GatewayConfig

    assert (
        GatewayConfig().max_frame_side,
        GatewayConfig().max_frame_bytes,
    ) == (MAX_FRAME_SIDE, MAX_FRAME_BYTES)
    launcher = Launcher(make_config(short_tmp, ("gateway",)), short_tmp / "run")
    launcher.start()
    try:
        with Client.connect(launcher.run_dir, timeout_s=10) as client:
            huge = np.zeros((5000, 5000, 3), np.uint8)
            with pytest.raises(ClientError, match=r"5000x5000 frame \(75.0 MB\).*scale it down"):
                client.push_frame(huge, ts=0.0)
            fitted = fit_frame(huge)
            assert fitted.nbytes <= MAX_FRAME_BYTES and fitted.shape[0] == fitted.shape[1] >= 2800
            assert fit_frame(fitted) is fitted  # within the limits: unchanged
            assert fit_frame(np.zeros((10, 9000, 3), np.uint8)).shape[1] == MAX_FRAME_SIDE
            assert client.push_frame(fitted, ts=0.0)
            time.sleep(0.5)
            status = client.status()
            assert status.stages["gateway"].counters.get("frames_in", 1) >= 1
            assert not [e for e in client.poll_events(0.2) if type(e).__name__ == "Error"]
    finally:
        launcher.shutdown()
    assert launcher.children["gateway"].restarts == 0


def test_source_credentials_never_reach_errors_or_logs() -> None:
    from omnistream.perception.live import open_source, redact

    assert redact("rtsp://admin:hunter2@10.0.0.5:554/s") == "rtsp://***@10.0.0.5:554/s"
    assert (
        redact("https://cam/live.m3u8?token=abc&x=1&api_key=k")
        == "https://cam/live.m3u8?token=***&x=1&api_key=***"
    )
    assert redact("/home/me/clip.mp4") == "/home/me/clip.mp4"
    # A URL that fails to open: the event (sent to every client as an Error, and logged) names
    # the source without its password or token.
    spec = "http://admin:hunter2@127.0.0.1:9/stream.ts?token=s3cret"
    source = open_source(spec, lambda image, ts: True, None, reconnect_s=60.0, stall_s=60.0).start()
    try:
        events = []
        wait_until(
            lambda: any(e.kind == "error" for e in events),
            20,
            lambda: f"the source's error event; events: {events}",
            every=lambda: events.extend(source.events()),
            interval=0.1,
        )
    finally:
        source.stop()
    text = " ".join(f"{e.source} {e.detail}" for e in events) + source.name
    assert "hunter2" not in text and "s3cret" not in text, text
    assert "127.0.0.1:9" in text


def test_a_session_belongs_to_the_client_key_that_opened_it(curve_gateway) -> None:
    """Beyond loopback, two authorised keys: bob cannot ask in, interrupt or read the history
    of alice's session (he could: every client could use every session); his own works."""
    _, keys_dir, port = curve_gateway("alice", "bob")
    endpoint = f"tcp://127.0.0.1:{port}"
    with (
        Client.connect(
            endpoint=endpoint, keys_dir=keys_dir, key_name="alice", session="trip", timeout_s=20
        ) as alice,
        Client.connect(
            endpoint=endpoint, keys_dir=keys_dir, key_name="bob", session="trip", timeout_s=20
        ) as bob,
    ):
        assert alice.send_ask("what is on screen?", ts=0.0)
        with pytest.raises(ClientError) as refused:
            bob.send_ask("what did alice see?", ts=0.0)
        assert refused.value.code == "not_your_session" and "another client key" in str(refused.value)
        with pytest.raises(ClientError) as refused:
            bob.history()
        assert refused.value.code == "not_your_session"
        bob.session = "bobs-own"
        assert bob.send_ask("and in my session?", ts=0.0)
        status = alice.status()
    assert status.stages["gateway"].counters["not_owner"] >= 2


def test_a_flood_of_big_requests_waits_in_the_client_not_in_the_gateway(short_tmp: Path) -> None:
    """One connection pushes 1 s chunks of 48 kHz audio (192 kB) as fast as its socket takes
    them for 6 s: the gateway queues at most CLIENT_QUEUE of them per connection (it queued 1000,
    ~190 MB), so its RSS stays within 100 MB of where it started."""
    import psutil

    from omnistream.app.gateway import CLIENT_QUEUE

    assert CLIENT_QUEUE <= 64
    launcher = Launcher(make_config(short_tmp, ("gateway",)), short_tmp / "run")
    launcher.start()
    gateway = psutil.Process(launcher.children["gateway"].pid)
    dealer = make_socket(zmq.Context.instance(), zmq.DEALER, hwm=16)
    try:
        dealer.connect(launcher.addresses.gateway)
        assert isinstance(_raw_status(launcher.addresses.gateway, wait_ms=10_000), Status)
        start_mb = peak_mb = gateway.memory_info().rss / (1 << 20)
        chunk = AudioChunk(pcm=np.full(48_000, 0.01, np.float32), sample_rate=48_000)
        sent, end, next_sample = 0, time.monotonic() + 6.0, 0.0
        while time.monotonic() < end:
            try:
                send(dealer, chunk, flags=zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.0005)
            while dealer.poll(0):
                dealer.recv_multipart()
            if time.monotonic() >= next_sample:
                peak_mb = max(peak_mb, gateway.memory_info().rss / (1 << 20))
                next_sample = time.monotonic() + 0.05
        assert sent > 200, sent
        assert peak_mb - start_mb < 100, (start_mb, peak_mb, sent)
        assert isinstance(_raw_status(launcher.addresses.gateway, wait_ms=10_000), Status)
    finally:
        dealer.close(linger=0)
        launcher.shutdown()


def test_the_launcher_warns_once_when_a_process_exceeds_its_rss_limit(short_tmp: Path) -> None:
    events: list[str] = []
    config = make_config(
        short_tmp, ("gateway",), **{"limits.rss_mb.gateway": 1, "launcher.stats_every_s": 0.1}
    )
    launcher = Launcher(config, short_tmp / "run", on_event=events.append)
    launcher.start()
    try:
        for _ in range(10):
            launcher.step(timeout_ms=100)
    finally:
        launcher.shutdown()
    over = [e for e in events if "over limits.rss_mb.gateway = 1 MB" in e]
    assert len(over) == 1, events  # once per crossing, not every step
    assert not [e for e in events if "limits.rss_mb.bus" in e]  # the bus is within its 512 MB


@pytest.mark.parametrize(
    "probe_runtime",
    [{"gateway.total_audio_speed": 2.0, "gateway.total_audio_burst_s": 5.0}],
    indirect=True,
)
def test_new_connections_do_not_buy_more_audio_than_the_gateways_total_budget(probe_runtime) -> None:  # noqa: F811
    """100 connections, each within its own budgets, send 1 s of audio each: the gateway passes
    on at most its total budget (5 s of burst, then 2x real time), the rest is dropped and
    counted (it passed on all 100 s: a loop over new connections filled speech's queue)."""
    from omnistream.app.gateway import GatewayStage

    gateway = GatewayStage(probe_runtime.config, probe_runtime.emit, probe_runtime.counters)
    second = np.zeros(16_000, np.float32)
    try:
        start = time.monotonic()
        for i in range(100):
            gateway.on_request(AudioChunk(session=f"s{i}", pcm=second), ("connection", f"c{i}".encode()))
        span = time.monotonic() - start
        accepted = probe_runtime.counters["in_AudioChunk"]
        assert 5 <= accepted <= 5 + 2.0 * span + 1, (accepted, span)
        assert probe_runtime.counters["audio_dropped_s"] == pytest.approx(100 - accepted)
    finally:
        gateway.close()
