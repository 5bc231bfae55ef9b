"""The launcher: one OS process per stage, READY handshakes, restarts with backoff, clean shutdown.

Each child runs ``python -m <module> --run-dir RUN`` with its stderr in ``RUN/logs/<stage>.log``
and dies with the launcher (``PR_SET_PDEATHSIG``), so even a SIGKILLed launcher leaves no orphan.
A child that exits while the system runs is restarted after a backoff that doubles per quick
failure (reset once it has stayed up); every restart is logged and counted in ``Stats``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.config import Config, save_config
from omnistream.protocol.messages import Ready, Shutdown, Stats
from omnistream.protocol.security import SecurityError, load_server_keys
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

log = logging.getLogger("omnistream.launcher")

STAGE_MODULES = {
    "bus": "omnistream.app.bus",
    "gateway": "omnistream.app.gateway",
    "perception": "omnistream.perception.stage",
    "memory": "omnistream.memory.stage",
    "reasoning": "omnistream.reasoning.stage",
    "speech": "omnistream.speech.stage",
}
STABLE_AFTER_S = 30.0
STOP_GRACE_S = 8.0
PR_SET_PDEATHSIG = 1


BUDGETED_STAGES = ("memory", "reasoning")  # launcher.ram_budget_mb covers these two together


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (/proc), nan when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return float("nan")


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the launcher dies, whatever the cause."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LaunchError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen | None = None
    ready: bool = False
    started_at: float = 0.0
    ready_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None
    history: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Launcher:
    def __init__(self, config: Config, run_dir: Path, on_event: Callable[[str], None] | None = None):
        unknown = [name for name in config.stages if name not in STAGE_MODULES or name == "bus"]
        if unknown:
            known = ", ".join(n for n in STAGE_MODULES if n != "bus")
            raise LaunchError(f"unknown stage {unknown[0]!r} (known: {known})")
        self.config = config
        self.run_dir = Path(run_dir)
        self.on_event = on_event or (lambda text: None)
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.ctx = zmq.Context.instance()
        self.control: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.addresses: Addresses | None = None
        self._last_stats = 0.0
        self._over_budget = False

    # -- start -------------------------------------------------------------------------------

    def check_security(self) -> Addresses:
        """The endpoints, after the loopback rule: a gateway beyond loopback needs CURVE keys."""
        bus, gateway = self.config.bus, self.config.gateway
        try:
            addresses = Addresses.for_run_dir(
                self.run_dir, bus.transport, bus.host, bus.base_port, gateway.host, gateway.port
            )
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        if addresses.curve:
            try:
                keys = load_server_keys(self.config.keys_dir)
            except SecurityError as exc:
                raise LaunchError(
                    f"gateway.host {gateway.host!r} is not loopback, so clients must authenticate with "
                    f"CURVE keys, and: {exc}"
                ) from None
            self.on_event(
                f"gateway on {addresses.gateway} with CURVE ({keys.authorized} authorised client key(s))"
            )
        return addresses

    def prepare_run_dir(self) -> None:
        # Everything this process and its stages create (run dir, logs, session data, spilled
        # KV blocks) is owner-only.
        os.umask(0o077)
        addresses = self.check_security()
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / "logs").mkdir(exist_ok=True, mode=0o700)
        pid_file = self.run_dir / "launcher.pid"
        if pid_file.exists():
            try:
                other = int(pid_file.read_text())
                os.kill(other, 0)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
            else:
                if other != os.getpid():
                    raise LaunchError(
                        f"omnistream is already running in {self.run_dir} (launcher pid {other})"
                    )
        pid_file.write_text(str(os.getpid()))
        for stale in self.run_dir.iterdir():
            if stale.is_socket():
                stale.unlink()
        self.config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_config(self.config, self.run_dir / "config.json")
        self.addresses = addresses
        self.addresses.save(self.run_dir)

    def start(self) -> None:
        """Start the bus and every stage; return once all are READY (or raise LaunchError)."""
        self.prepare_run_dir()
        assert self.addresses is not None
        self.control = make_socket(self.ctx, zmq.PULL)
        self.control.bind(self.addresses.control)
        self._spawn("bus")
        self.wait_ready(["bus"], timeout_s=30.0)
        self.pub = make_socket(self.ctx, zmq.PUB)
        self.pub.connect(self.addresses.bus_in)
        for name in self.config.stages:
            self._spawn(name)
        self.wait_ready(list(self.config.stages), timeout_s=self.config.launcher.ready_timeout_s)

    def _spawn(self, name: str) -> None:
        child = self.children.setdefault(name, Child(name))
        log_file = open(self.run_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ)
        env.setdefault("OMNISTREAM_LOG_LEVEL", "INFO")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # numpy's BLAS: one thread per stage. The stages share the cores already (torch has its
        # own threads setting); OpenBLAS threads spinning against them made the memory
        # process's MiniLM 40x slower on 2 busy cores.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env["HF_HUB_OFFLINE"] = "1"
        child.process = subprocess.Popen(
            [sys.executable, "-m", STAGE_MODULES[name], "--run-dir", str(self.run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=env,
            preexec_fn=_die_with_parent,
            # Own process group: a terminal's Ctrl-C reaches the launcher only, which then stops
            # the stages in order (bus last) instead of them all dying at once.
            start_new_session=True,
        )
        log_file.close()
        child.ready = False
        child.started_at = time.monotonic()
        child.restart_at = None
        self.on_event(f"started {name} (pid {child.pid})")

    def wait_ready(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(self.children[n].ready for n in names):
            for name in names:
                child = self.children[name]
                if not child.alive():
                    code = child.process.returncode if child.process else None
                    raise LaunchError(
                        f"{name} exited with code {code} before READY; see {self.run_dir / 'logs' / (name + '.log')}"
                    )
            if time.monotonic() > deadline:
                missing = [n for n in names if not self.children[n].ready]
                raise LaunchError(f"not READY after {timeout_s:.0f} s: {', '.join(missing)}")
            self._read_control(timeout_ms=200)

    def _read_control(self, timeout_ms: int) -> None:
        assert self.control is not None
        if not self.control.poll(timeout_ms):
            return
        while True:
            try:
                _, message = recv(self.control, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                log.warning("bad control message: %s", exc)
                continue
            if isinstance(message, Ready) and message.stage in self.children:
                child = self.children[message.stage]
                if child.pid == message.pid:
                    child.ready, child.ready_at = True, time.monotonic()
                    self.on_event(f"{message.stage} ready (pid {message.pid})")

    # -- supervise ------------------------------------------------------------------------------

    def step(self, timeout_ms: int = 200) -> None:
        """One supervision step: READYs, dead children, scheduled restarts, stats."""
        self._read_control(timeout_ms)
        now = time.monotonic()
        for child in self.children.values():
            if self.stopping:
                break
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._spawn(child.name)
                continue
            if not child.alive():
                code = child.process.returncode if child.process else None
                uptime = now - child.started_at
                max_backoff = self.config.launcher.restart_backoff_max_s
                base = self.config.launcher.restart_backoff_s
                child.backoff_s = (
                    base
                    if uptime > STABLE_AFTER_S or not child.backoff_s
                    else min(child.backoff_s * 2, max_backoff)
                )
                child.restarts += 1
                child.restart_at = now + child.backoff_s
                child.ready = False
                event = f"{child.name} exited (code {code}) after {uptime:.1f} s; restart #{child.restarts} in {child.backoff_s:.1f} s"
                child.history.append(event)
                log.warning(
                    "stage exited",
                    extra={
                        "stage": child.name,
                        "code": code,
                        "restart": child.restarts,
                        "backoff_s": child.backoff_s,
                    },
                )
                self.on_event(event)
        if self.pub is not None and now - self._last_stats >= self.config.launcher.stats_every_s:
            self._last_stats = now
            counters = {f"{c.name}.restarts": float(c.restarts) for c in self.children.values()}
            counters.update({f"{c.name}.ready": float(c.ready) for c in self.children.values()})
            rss = {c.name: rss_mb(c.pid) for c in self.children.values() if c.alive()}
            counters.update({f"{name}.rss_mb": value for name, value in rss.items()})
            self._check_budget(rss)
            send(self.pub, Stats(stage="launcher", pid=os.getpid(), counters=counters))

    def _check_budget(self, rss: dict[str, float]) -> None:
        """Warn (once per crossing) when memory + reasoning hold more than ``ram_budget_mb``."""
        used = sum(rss.get(name, 0.0) for name in BUDGETED_STAGES if math.isfinite(rss.get(name, 0.0)))
        over = used > self.config.launcher.ram_budget_mb > 0
        if over and not self._over_budget:
            log.warning(
                "memory + reasoning over their RAM budget",
                extra={"rss_mb": round(used), "budget_mb": self.config.launcher.ram_budget_mb},
            )
        self._over_budget = over

    def status_rows(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "stage": c.name,
                "pid": c.pid,
                "state": "ready" if c.ready else ("restarting" if c.restart_at else "starting"),
                "restarts": c.restarts,
                "up_s": round(now - c.started_at, 1) if c.alive() else 0.0,
                "rss_mb": round(rss_mb(c.pid)) if c.alive() else 0,
            }
            for c in self.children.values()
        ]

    # -- stop -------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """SIGTERM every stage (then the bus), SIGKILL what outlives the grace period."""
        self.stopping = True
        if self.pub is not None:
            send(self.pub, Shutdown(reason="launcher stopping"))
        stages = [c for n, c in self.children.items() if n != "bus"]
        bus = [c for n, c in self.children.items() if n == "bus"]
        for group in (stages, bus):
            for child in group:
                if child.alive():
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.warning("stage did not stop in time; killing", extra={"stage": child.name})
                    child.process.kill()
                    child.process.wait()
        for sock in (self.pub, self.control):
            if sock is not None:
                sock.close(linger=0)
        for name in ("addresses.json", "launcher.pid"):
            (self.run_dir / name).unlink(missing_ok=True)
        self.on_event("all stages stopped")

    def run_forever(self, on_tick: Callable[[], None] | None = None) -> None:
        """Supervise until SIGINT/SIGTERM, then shut down."""
        stop = {"now": False}

        def request_stop(*_args) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        try:
            while not stop["now"]:
                self.step()
                if on_tick is not None:
                    on_tick()
        finally:
            self.shutdown()


def status_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
