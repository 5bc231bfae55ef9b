"""`omnistream up --ray ADDRESS`: the stages placed across the machines of a Ray cluster.

Ray places, starts and restarts; ZeroMQ still carries every message. Each stage is a Ray actor
(``StageActor``) that runs the stage as its child process on the node Ray chose, exactly as the
local launcher would (``python -m omnistream.app.cluster stage ...``, which wraps the stage's
``main``), and that exits when its child dies, so Ray restarts the actor (``max_restarts=-1``)
and with it the stage, on a node with the same resources, while the rest keeps running.

- Placement: a stage goes to a node offering the custom resource ``omnistream_<stage>``
  (``ray start --resources '{"omnistream_reasoning": 1}'`` on the GPU box, ``omnistream_perception``
  on the one with the camera) when any node offers it, anywhere otherwise; the gateway without
  one goes to the node that runs ``omnistream up`` (Ray's ``node:<ip>`` resource): its client
  sockets are ipc there unless ``gateway.host`` serves them over tcp (CURVE, its own keys).
- Addresses: the bus and memory bind tcp ports on their node's IP and publish them in the
  cluster's key-value store (Ray's GCS, ``_internal_kv``); every other stage reads them there
  before it starts. A restarted bus or memory binds the same ports again, so the others'
  sockets reconnect by themselves. The node-local run directory of each actor only holds the
  files a stage reads at start (config, addresses, keys) and its READY socket.
- Security: every tcp socket between stages is CURVE-encrypted and authenticated (a ZAP
  handler admits only the cluster's client key); the key pairs are made by ``up`` and handed to
  the actors by Ray. The gateway's client side is as configured (``gateway.host`` and its keys).
- Sharding: ``cluster.reasoning_replicas`` reasoning actors each own the sessions whose stable
  hash (``owner``) falls on them; every replica receives the bus's messages and drops those of
  sessions it does not own, so each session's records, questions and watches reach exactly one
  replica (memory is one process and serves them all).

The status table shows each stage's node, pid, restarts (counted in the key-value store) and RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from omnistream.app.launcher import STAGE_MODULES  # the one table of stage -> module
from omnistream.protocol.config import Config, save_config

NAMESPACE = "omnistream"
ZAP_DOMAIN = "omnistream-cluster"
STOP_ORDER = ("gateway", "perception", "speech", "memory", "reasoning", "bus")


def owner(session: str, replicas: int) -> int:
    """The reasoning replica that owns ``session``: a stable hash (the same on every host and
    run, unlike Python's ``hash``), so a session always lands on the same replica."""
    digest = hashlib.blake2b(session.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(replicas, 1)


def resource_name(stage: str) -> str:
    return f"omnistream_{stage.split('-')[0]}"


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _wait_port_free(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"port {port} on {host} still in use after {timeout_s:.0f} s"
                    ) from None
        time.sleep(0.2)


# -- inside the stage process ------------------------------------------------------------------------


def secure_tcp(keys: dict[str, str], authorized_dir: Path) -> None:
    """Make every tcp socket of this process CURVE: a bind is a server (the cluster's server
    pair, a ZAP handler admitting the keys in ``authorized_dir``), a connect a client (the
    cluster's client pair). Sockets already set up for CURVE (the gateway's) are left as they are."""
    from zmq.auth.thread import ThreadAuthenticator

    server_public, server_secret = keys["server_public"].encode(), keys["server_secret"].encode()
    client_public, client_secret = keys["client_public"].encode(), keys["client_secret"].encode()
    authenticators: dict[int, ThreadAuthenticator] = {}
    bind, connect, term = zmq.Socket.bind, zmq.Socket.connect, zmq.Context.term

    def secure_bind(self: zmq.Socket, address: str) -> Any:
        if address.startswith("tcp://") and self.getsockopt(zmq.MECHANISM) != zmq.CURVE:
            if id(self.context) not in authenticators:
                auth = ThreadAuthenticator(self.context)
                auth.start()
                auth.configure_curve(domain=ZAP_DOMAIN, location=str(authorized_dir))
                authenticators[id(self.context)] = auth
            self.setsockopt(zmq.CURVE_SERVER, 1)
            self.setsockopt(zmq.CURVE_PUBLICKEY, server_public)
            self.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
            self.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        return bind(self, address)

    def secure_connect(self: zmq.Socket, address: str) -> Any:
        if address.startswith("tcp://") and self.getsockopt(zmq.MECHANISM) != zmq.CURVE:
            self.setsockopt(zmq.CURVE_SERVERKEY, server_public)
            self.setsockopt(zmq.CURVE_PUBLICKEY, client_public)
            self.setsockopt(zmq.CURVE_SECRETKEY, client_secret)
        return connect(self, address)

    def term_after_auth(self: zmq.Context) -> Any:  # the ZAP handler's socket would block term
        auth = authenticators.pop(id(self), None)
        if auth is not None:
            auth.stop()
        return term(self)

    zmq.Socket.bind, zmq.Socket.connect, zmq.Context.term = secure_bind, secure_connect, term_after_auth


# What a reasoning replica receives about one session (every message has a ``session``; these are
# the ones whose session says whose they are: Shutdown and the like go to every replica).
SHARDED = frozenset(
    ("Record", "Ask", "Interrupt", "Draft", "Watch", "DeleteSession", "UserSpeech", "Transcript", "Synopsis")
)


def shard_filter(index: int, replicas: int) -> None:
    """This reasoning replica keeps only the messages of the sessions it owns (``SHARDED``
    types; the others, such as Shutdown, reach every replica); memory's replies (to its own
    requests) all pass."""
    from omnistream.protocol import runtime

    drain = runtime.Runtime._drain

    def owned_only(self, sock, latest_only: bool):
        messages = drain(self, sock, latest_only)
        if sock is self.memory:
            return messages
        kept = [m for m in messages if type(m).__name__ not in SHARDED or owner(m.session, replicas) == index]
        self.counters["not_my_shard"] += len(messages) - len(kept)
        return kept

    init = runtime.Runtime.__init__

    def named_replica(self, name, *args, **kwargs) -> None:
        init(self, name, *args, **kwargs)
        self.name = f"{name}-{index}"  # its Stats say which replica: the gateway knows whose sessions

    runtime.Runtime._drain = owned_only
    runtime.Runtime.__init__ = named_replica


def stage_main(argv: list[str]) -> None:
    """``python -m omnistream.app.cluster stage --module M --run-dir D [--shard I/N]``."""
    parser = argparse.ArgumentParser(prog="omnistream-cluster-stage")
    parser.add_argument("--module", required=True, choices=sorted(STAGE_MODULES.values()))
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--shard", default="")
    args = parser.parse_args(argv)
    keys = json.loads((args.run_dir / "cluster_keys.json").read_text())
    secure_tcp(keys, args.run_dir / "authorized")
    if args.shard:
        index, _, count = args.shard.partition("/")
        shard_filter(int(index), int(count))
    sys.argv = [args.module, "--run-dir", str(args.run_dir)]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


# -- the Ray side ------------------------------------------------------------------------------------


def _kv(system: str, key: str) -> bytes:
    return f"{system}/{key}".encode()


def make_actor_class(ray):  # noqa: ANN001 - ray is imported by the caller (an optional extra)
    from ray.experimental import internal_kv

    def kv_get(system: str, key: str) -> Any:
        raw = internal_kv._internal_kv_get(_kv(system, key), namespace=NAMESPACE)
        return json.loads(raw) if raw else None

    def kv_put(system: str, key: str, value: Any) -> None:
        internal_kv._internal_kv_put(_kv(system, key), json.dumps(value), overwrite=True, namespace=NAMESPACE)

    class StageActor:
        """One stage on the node Ray placed it on: its child process, READY, and an exit of the
        actor when the child dies (Ray then restarts both)."""

        def __init__(self, system: str, name: str, config_json: bytes, keys: dict, shard: str = ""):
            import msgspec

            from omnistream.app.launcher import _die_with_parent
            from omnistream.protocol.messages import Ready
            from omnistream.protocol.sockets import Addresses, make_socket, recv

            self.system, self.name, self.stopping = system, name, False
            self.ip = ray.util.get_node_ip_address()
            self.node = ray.get_runtime_context().get_node_id()
            config = msgspec.json.decode(config_json, type=Config)
            # The same directory after a restart on this node: the gateway's ipc sockets keep their path.
            self.run_dir = Path(tempfile.gettempdir()) / f"os-ray-{system[:8]}" / name
            self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.run_dir, 0o700)
            (self.run_dir / "authorized").mkdir(exist_ok=True, mode=0o700)
            (self.run_dir / "authorized" / "cluster.key").write_text(
                f'metadata\ncurve\n    public-key = "{keys["client_public"]}"\n'
            )
            fd = os.open(self.run_dir / "cluster_keys.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(keys, out)
            save_config(config, self.run_dir / "config.json")
            endpoints = {"control": f"ipc://{self.run_dir / 'control'}"}
            endpoints.update(self._exchange(kv_get, kv_put, config))
            Addresses(**endpoints).save(self.run_dir)
            control = make_socket(zmq.Context.instance(), zmq.PULL)
            for stale in ("control", "gateway", "gateway_pub"):
                (self.run_dir / stale).unlink(missing_ok=True)
            control.bind(endpoints["control"])
            restarts = kv_get(system, f"restarts/{name}")
            self.restarts = 0 if restarts is None else int(restarts) + 1
            kv_put(system, f"restarts/{name}", self.restarts)
            log = open(self.run_dir / "stage.log", "ab")  # noqa: SIM115 - owned by the child
            command = [
                sys.executable,
                "-m",
                "omnistream.app.cluster",
                "stage",
                "--module",
                STAGE_MODULES[name.split("-")[0]],
            ]
            command += ["--run-dir", str(self.run_dir)] + (["--shard", shard] if shard else [])
            env = {
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "OPENBLAS_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
            env["OMNISTREAM_LOG_FILE"] = str(self.run_dir / "stage.log")
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=_die_with_parent,
            )
            log.close()
            deadline = time.monotonic() + config.launcher.ready_timeout_s
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {self.process.returncode} before READY; see {self.run_dir / 'stage.log'}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not READY after {config.launcher.ready_timeout_s:.0f} s")
                if control.poll(200):
                    _, message = recv(control)
                    if isinstance(message, Ready):
                        break
            control.close(0)
            threading.Thread(target=self._watch, daemon=True).start()

        def _exchange(self, kv_get, kv_put, config: Config) -> dict[str, Any]:
            """Publish what this stage binds; wait for what it connects to (bus, memory)."""
            base = self.name.split("-")[0]
            mine: dict[str, Any] = {}
            if base in ("bus", "memory"):
                keys = ("bus_in", "bus_out", "media_in", "media_out") if base == "bus" else ("memory",)
                before = kv_get(self.system, base) or {}
                same_node = all(before.get(k, "").startswith(f"tcp://{self.ip}:") for k in keys)
                mine = before if same_node else {k: f"tcp://{self.ip}:{_free_port(self.ip)}" for k in keys}
                for endpoint in mine.values():  # a killed incarnation's stage may still hold it (flushing)
                    _wait_port_free(self.ip, int(endpoint.rsplit(":", 1)[1]), 60.0)
                kv_put(self.system, base, mine)
            if base == "gateway":  # clients on this node reach it here; gateway.host: over tcp + CURVE
                from omnistream.protocol.security import is_loopback
                from omnistream.protocol.sockets import ENDPOINTS

                host = config.gateway.host
                mine = {
                    "gateway": f"ipc://{self.run_dir / 'gateway'}",
                    "gateway_pub": f"ipc://{self.run_dir / 'gateway_pub'}",
                }
                if not is_loopback(host):  # its own keys (gateway.keys_dir on this node)
                    port = config.gateway.port or config.bus.base_port + ENDPOINTS.index("gateway")
                    mine = {
                        "gateway": f"tcp://{host}:{port}",
                        "gateway_pub": f"tcp://{host}:{port + 1}",
                        "curve": True,
                    }
                kv_put(self.system, "gateway", mine)
            needs = {"bus": (), "memory": ("bus",)}.get(base, ("bus", "memory"))
            endpoints = {"gateway": "", "gateway_pub": "", "memory": "", **mine}
            deadline = time.monotonic() + 120
            for other in needs:
                while (found := kv_get(self.system, other)) is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name}: no {other} in the cluster after 120 s")
                    time.sleep(0.2)
                endpoints.update(found)
            return endpoints

        def _watch(self) -> None:
            while self.process.poll() is None or self.stopping:
                if self.stopping:
                    return
                time.sleep(0.3)
            os._exit(1)  # the stage died: so does the actor, and Ray restarts it

        def info(self) -> dict:
            from omnistream.app.launcher import rss_mb

            alive = self.process.poll() is None
            return {
                "stage": self.name,
                "node": self.node[:8],
                "ip": self.ip,
                "pid": self.process.pid,
                "actor_pid": os.getpid(),
                "state": "ready" if alive else "exited",
                "restarts": self.restarts,
                "rss_mb": round(rss_mb(self.process.pid)) if alive else 0,
            }

        def stop(self, timeout_s: float = 10.0) -> int | None:
            self.stopping = True
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            return self.process.wait()

    return ray.remote(StageActor)


class ClusterSystem:
    """The driver of ``omnistream up --ray``: starts every stage as an actor (bus and memory
    first), writes a local run directory whose addresses reach the gateway, shows status, stops."""

    def __init__(self, config: Config, address: str, run_dir: Path):
        import ray

        self.ray = ray
        self.config = config
        self.address = address
        self.run_dir = Path(run_dir)
        self.system = f"os{os.getpid()}-{int(time.time())}"
        self.actors: dict[str, Any] = {}

    def _keys(self) -> dict[str, str]:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return {
            "server_public": server_public.decode(),
            "server_secret": server_secret.decode(),
            "client_public": client_public.decode(),
            "client_secret": client_secret.decode(),
        }

    def names(self) -> list[str]:
        replicas = max(self.config.cluster.reasoning_replicas, 1)
        out = ["bus"]
        for stage in self.config.stages:
            if stage == "reasoning":
                out += ["reasoning"] if replicas == 1 else [f"reasoning-{i}" for i in range(replicas)]
            else:
                out.append(stage)
        # memory right after the bus: the other stages connect to both
        return [
            "bus",
            *(["memory"] if "memory" in out else []),
            *[n for n in out if n not in ("bus", "memory")],
        ]

    def start(self, on_event=lambda text: None) -> None:
        import msgspec

        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
        offered = {key for node in ray.nodes() if node.get("Alive") for key in node.get("Resources", {})}
        here = ray.util.get_node_ip_address()
        actor_class = make_actor_class(ray)
        keys = self._keys()
        config_json = msgspec.json.encode(self.config)
        replicas = max(self.config.cluster.reasoning_replicas, 1)
        pending = []
        for name in self.names():
            resources = {}
            if resource_name(name) in offered:
                resources[resource_name(name)] = 0.001
            elif name == "gateway":  # clients (and this driver) reach it where `up` runs
                resources[f"node:{here}"] = 0.001
            shard = f"{name.split('-')[1]}/{replicas}" if name.startswith("reasoning-") else ""
            actor = actor_class.options(
                name=f"{self.system}-{name}",
                num_cpus=0,
                resources=resources,
                max_restarts=-1,
                max_task_retries=-1,
            ).remote(self.system, name, config_json, keys, shard)
            self.actors[name] = actor
            on_event(f"placing {name}" + (f" on {', '.join(resources)}" if resources else " anywhere"))
            pending.append((name, actor))
            if name in ("bus", "memory"):  # the others wait for their addresses anyway; READY first
                self._ready([(name, actor)])
        self._ready(pending)
        gateway = self.ray.get(self.actors["gateway"].info.remote()) if "gateway" in self.actors else None
        self._write_run_dir(gateway)

    def _ready(self, actors: list) -> None:
        timeout = self.config.launcher.ready_timeout_s + 60
        self.ray.get([actor.info.remote() for _, actor in actors], timeout=timeout)

    def _write_run_dir(self, gateway: dict | None) -> None:
        """A local run directory whose addresses reach the gateway (``--run-dir`` for clients)."""
        from ray.experimental import internal_kv

        from omnistream.protocol.sockets import Addresses

        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        names = dict.fromkeys(("bus_in", "bus_out", "media_in", "media_out", "control", "memory"), "")
        names.update(gateway="", gateway_pub="")
        if gateway is not None:  # the gateway published its client endpoints in the cluster
            raw = internal_kv._internal_kv_get(_kv(self.system, "gateway"), namespace=NAMESPACE)
            names.update(json.loads(raw))
        Addresses(**names).save(self.run_dir)
        (self.run_dir / "launcher.pid").write_text(str(os.getpid()))
        save_config(self.config, self.run_dir / "config.json")

    def status_rows(self, timeout_s: float = 2.0) -> list[dict]:
        rows = []
        for name, actor in self.actors.items():
            try:
                rows.append(self.ray.get(actor.info.remote(), timeout=timeout_s))
            except Exception:  # restarting (its calls wait for it) or gone
                rows.append(
                    {
                        "stage": name,
                        "node": "",
                        "ip": "",
                        "pid": 0,
                        "actor_pid": 0,
                        "state": "restarting",
                        "restarts": "",
                        "rss_mb": 0,
                    }
                )
        return rows

    def shutdown(self) -> None:
        for name in sorted(
            self.actors,
            key=lambda n: STOP_ORDER.index(n.split("-")[0]) if n.split("-")[0] in STOP_ORDER else 99,
        ):
            actor = self.actors[name]
            with contextlib.suppress(Exception):
                self.ray.get(
                    actor.stop.remote(self.config.launcher.stop_timeout_s / 2),
                    timeout=self.config.launcher.stop_timeout_s,
                )
            self.ray.kill(actor, no_restart=True)
        for path in (self.run_dir / "launcher.pid", self.run_dir / "addresses.json"):
            path.unlink(missing_ok=True)
        self.actors.clear()


def cmd_up_ray(args: argparse.Namespace, config: Config, run_dir: Path, console, stage_table) -> int:  # noqa: ANN001
    """``omnistream up --ray ADDRESS``: start, show each stage's node until Ctrl-C, stop."""
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        console.print(
            "[red]--ray needs Ray: pip install 'omnistream[cluster]' (or bash scripts/install.sh --cluster)[/red]"
        )
        return 2
    system = ClusterSystem(config, args.ray, run_dir)
    try:
        system.start(on_event=console.log)
    except Exception as exc:
        console.print(f"[red]start on the Ray cluster failed:[/red] {exc}")
        system.shutdown()
        return 1
    try:
        if args.json:
            print(json.dumps(system.status_rows()), flush=True)
            while True:
                time.sleep(1.0)
        from rich.live import Live

        title = f"omnistream on the Ray cluster {args.ray} (clients: --run-dir {run_dir}; Ctrl-C stops everything)"
        with Live(stage_table(system.status_rows(), title), console=console, refresh_per_second=1) as live:
            while True:
                time.sleep(2.0)
                live.update(stage_table(system.status_rows(), title))
    except KeyboardInterrupt:
        return 0
    finally:
        system.shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stage"]:
        stage_main(argv[1:])
    else:
        raise SystemExit("usage: python -m omnistream.app.cluster stage --module M --run-dir D [--shard I/N]")


if __name__ == "__main__":
    main()
