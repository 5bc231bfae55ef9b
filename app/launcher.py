"""The launcher: one OS process per stage, READY handshakes, restarts with backoff, heartbeats,
an ordered shutdown.

Each child runs ``python -m <module> --run-dir RUN`` with its stdout and stderr in
``<log dir>/<stage>.log`` (``Config.log_dir``: RUN/logs, or the user log folder for the system in
the default run directory), rotated by size (``launcher.log_max_bytes``, ``launcher.log_backups``:
the stage rotates it as it logs, the launcher before it starts one), and dies with the launcher
(``PR_SET_PDEATHSIG``), so even a SIGKILLed launcher leaves no orphan.
A child that exits while the system runs is restarted after a backoff that doubles per quick
failure (reset once it has stayed up); every restart is logged and counted in ``Stats``.

Heartbeat: every stage publishes ``Stats`` each ``launcher.stats_every_s`` (from its loop and
from every poll, so a long answer beats too). A ready stage silent for
``launcher.heartbeat_timeout_s`` whose main thread is stopped or used no CPU in that time is hung:
it is killed and restarted like a crashed one. A stage busy computing (CPU moving) is left alone.

Stopping (``shutdown``) follows the data: the gateway first (no new input), then perception and
speech, memory, reasoning, the rest, the bus last. Each stage, on SIGTERM, handles what it has
already received and flushes (protocol/runtime.py) before it exits, and the next one is stopped
only then, so the open clip and memory's backlog are stored. ``launcher.stop_timeout_s`` bounds
it all: whatever is still running when its share of that time is up is killed.

``supervise`` is the one supervision loop: ``omnistream up`` runs it in the main thread,
``running_system`` (replay, eval, demo) in a thread (``supervise_in_thread``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.config import Config, save_config
from omnistream.protocol.logs import rotate_if_full
from omnistream.protocol.messages import Ready, Stats
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
# Stopped in this order (data flows this way); stages not named here after them, the bus last.
STOP_ORDER = (("gateway",), ("perception", "speech"), ("memory",), ("reasoning",))


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


def main_thread_cpu(pid: int) -> tuple[str, int] | None:
    """(state, utime + stime in clock ticks) of a process's main thread, None when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None
    return fields[0], int(fields[11]) + int(fields[12])


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the launcher dies, whatever the cause."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LaunchError(RuntimeError):
    pass


OWNER_FILE = "launcher.json"  # in the data directory: the live system (pid, run dir) that holds it


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError, ValueError):
        return False
    return True


def running_in(run_dir: Path) -> bool:
    """Is a system running in ``run_dir`` (its launcher alive, its addresses published)?"""
    try:
        pid = int((run_dir / "launcher.pid").read_text())
    except (OSError, ValueError):
        return False
    return (run_dir / "addresses.json").exists() and pid_running(pid)


def data_dir_owner(data_dir: Path) -> Path | None:
    """The run directory of the live system that holds ``data_dir``, if one does."""
    try:
        owner = json.loads((Path(data_dir) / OWNER_FILE).read_text())
        pid, run_dir = int(owner["pid"]), Path(owner["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_dir if pid_running(pid) and running_in(run_dir) else None


def live_run_dir(config: Config, run_dir: Path | None) -> Path | None:
    """The system a command should attach to: the one in ``run_dir`` when given; otherwise the
    one holding ``config``'s data directory, or the one in the default run directory. None: no
    system runs there (start one)."""
    if run_dir is not None:
        return run_dir if running_in(run_dir) else None
    owner = data_dir_owner(config.data_dir)
    if owner is not None:
        return owner
    from omnistream.app.client_core import default_run_dir

    default = default_run_dir()
    return default if running_in(default) else None


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
    last_beat: float = 0.0  # monotonic time of its last Stats (or of READY)
    cpu_ticks: int = -1  # its main thread's CPU time when last sampled
    cpu_moved_at: float = 0.0  # monotonic time its main thread's CPU time last moved
    hung_kills: int = 0

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
        self.log_dir = config.log_dir(self.run_dir)
        self.on_event = on_event or (lambda text: None)
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.ctx = zmq.Context.instance()
        self.control: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.beats: zmq.Socket | None = None
        self.addresses: Addresses | None = None
        self._last_stats = 0.0
        self._over_budget = False
        self._over_rss: set[str] = set()  # stages over limits.rss_mb

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
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        owner = data_dir_owner(self.config.data_dir)
        if owner is not None and owner.resolve() != self.run_dir.resolve():
            raise LaunchError(
                f"the data directory {self.config.data_dir} is in use by the system running in "
                f"{owner}: attach to it (--run-dir {owner}) or stop it first"
            )
        pid_file.write_text(str(os.getpid()))
        for stale in self.run_dir.iterdir():
            if stale.is_socket():
                stale.unlink()
        self.config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.config.data_dir / OWNER_FILE).write_text(
            json.dumps({"pid": os.getpid(), "run_dir": str(self.run_dir.resolve())})
        )
        save_config(self.config, self.run_dir / "config.json")
        self.addresses = addresses
        self.addresses.save(self.run_dir)

    def start(self) -> None:
        """Start the bus and every stage; return once all are READY (or raise LaunchError)."""
        self.prepare_run_dir()
        assert self.addresses is not None
        self.on_event(f"stage logs in {self.log_dir}")
        self.control = make_socket(self.ctx, zmq.PULL)
        self.control.bind(self.addresses.control)
        self._spawn("bus")
        self.wait_ready(["bus"], timeout_s=30.0)
        self.pub = make_socket(self.ctx, zmq.PUB)
        self.pub.connect(self.addresses.bus_in)
        self.beats = make_socket(self.ctx, zmq.SUB, hwm=10000)
        self.beats.connect(self.addresses.bus_out)
        self.beats.setsockopt(zmq.SUBSCRIBE, b"Stats")
        for name in self.config.stages:
            self._spawn(name)
        self.wait_ready(list(self.config.stages), timeout_s=self.config.launcher.ready_timeout_s)

    def _spawn(self, name: str) -> None:
        child = self.children.setdefault(name, Child(name))
        log_path = self.log_dir / f"{name}.log"
        limits = self.config.launcher
        rotate_if_full(log_path, limits.log_max_bytes, limits.log_backups)
        log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ)
        # The stage logs to the same file through a handler that rotates it (protocol/logs.py).
        env["OMNISTREAM_LOG_FILE"] = str(log_path)
        env["OMNISTREAM_LOG_MAX_BYTES"] = str(limits.log_max_bytes)
        env["OMNISTREAM_LOG_BACKUPS"] = str(limits.log_backups)
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
                        f"{name} exited with code {code} before READY; see {self.log_dir / (name + '.log')}"
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
                    child.last_beat = child.cpu_moved_at = child.ready_at
                    child.cpu_ticks = -1
                    self.on_event(f"{message.stage} ready (pid {message.pid})")

    # -- supervise ------------------------------------------------------------------------------

    def _read_beats(self) -> None:
        """Every stage's ``Stats`` seen on the bus: its heartbeat."""
        if self.beats is None:
            return
        by_pid = {c.pid: c for c in self.children.values() if c.process is not None}
        while True:
            try:
                _, message = recv(self.beats, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError:
                continue
            child = by_pid.get(getattr(message, "pid", 0))
            if isinstance(message, Stats) and child is not None and child.name == message.stage:
                child.last_beat = time.monotonic()

    def _check_heartbeats(self, now: float) -> None:
        """Kill a ready stage that stopped beating while its main thread stands still (stopped,
        blocked, deadlocked): the dead-child path below restarts it."""
        timeout = self.config.launcher.heartbeat_timeout_s
        if timeout <= 0:
            return
        for child in self.children.values():
            if child.name == "bus" or not child.ready or not child.alive():
                continue
            sample = main_thread_cpu(child.pid)
            if sample is None:
                continue
            state, ticks = sample
            if ticks != child.cpu_ticks:
                child.cpu_ticks, child.cpu_moved_at = ticks, now
            silent = now - child.last_beat
            if silent < timeout:
                continue
            if state not in ("T", "t") and now - child.cpu_moved_at < timeout:
                continue  # busy computing: its main thread is using CPU
            event = (
                f"{child.name} hung: no Stats for {silent:.1f} s and its main thread "
                f"{'stopped' if state in ('T', 't') else 'idle'}; killing it (pid {child.pid})"
            )
            child.history.append(event)
            child.hung_kills += 1
            log.warning("stage hung", extra={"stage": child.name, "silent_s": round(silent, 1)})
            self.on_event(event)
            child.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)

    def step(self, timeout_ms: int = 200) -> None:
        """One supervision step: READYs, heartbeats, dead children, scheduled restarts, stats."""
        self._read_control(timeout_ms)
        self._read_beats()
        now = time.monotonic()
        if not self.stopping:
            self._check_heartbeats(now)
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
            counters.update({f"{c.name}.hung_kills": float(c.hung_kills) for c in self.children.values()})
            rss = {c.name: rss_mb(c.pid) for c in self.children.values() if c.alive()}
            counters.update({f"{name}.rss_mb": value for name, value in rss.items()})
            self._check_budget(rss)
            counters.update({f"{name}.over_rss": float(name in self._over_rss) for name in rss})
            send(self.pub, Stats(stage="launcher", pid=os.getpid(), counters=counters))

    def _check_budget(self, rss: dict[str, float]) -> None:
        """Warn (once per crossing) when memory + reasoning hold more than ``ram_budget_mb``, or a
        stage more than its ``limits.rss_mb``."""
        used = sum(rss.get(name, 0.0) for name in BUDGETED_STAGES if math.isfinite(rss.get(name, 0.0)))
        over = used > self.config.launcher.ram_budget_mb > 0
        if over and not self._over_budget:
            log.warning(
                "memory + reasoning over their RAM budget",
                extra={"rss_mb": round(used), "budget_mb": self.config.launcher.ram_budget_mb},
            )
        self._over_budget = over
        limits = self.config.limits.rss_mb
        for name, value in rss.items():
            limit = getattr(limits, name, 0)
            over = bool(limit) and math.isfinite(value) and value > limit
            if over and name not in self._over_rss:
                log.warning(
                    "stage over its RSS limit",
                    extra={"stage": name, "rss_mb": round(value), "limit_mb": limit},
                )
                self.on_event(f"{name} uses {value:.0f} MB, over limits.rss_mb.{name} = {limit} MB")
            (self._over_rss.add if over else self._over_rss.discard)(name)

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

    def stop_groups(self) -> list[list[Child]]:
        """The children in stopping order: ``STOP_ORDER``, then other stages, the bus last."""
        named = [name for group in STOP_ORDER for name in group]
        groups = [[self.children[n] for n in group if n in self.children] for group in STOP_ORDER]
        groups.append([c for n, c in self.children.items() if n not in named and n != "bus"])
        groups.append([c for n, c in self.children.items() if n == "bus"])
        return [group for group in groups if group]

    def shutdown(self) -> None:
        """Stop the stages group by group in ``STOP_ORDER`` (SIGTERM; each drains and flushes,
        and the next group is stopped once it has exited), then the bus. Everything is done
        within ``launcher.stop_timeout_s``: a group still running when its share is up is killed
        (each later group keeps at least a second)."""
        self.stopping = True
        started = time.monotonic()
        deadline = started + max(self.config.launcher.stop_timeout_s, 1.0)
        groups = self.stop_groups()
        for index, group in enumerate(groups):
            left_after = len(groups) - index - 1
            group_deadline = min(
                deadline - left_after * 1.0,
                time.monotonic() + self.config.launcher.drain_s + STOP_GRACE_S + 2.0,
            )
            group_started = time.monotonic()
            for child in group:
                if child.alive():
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(timeout=max(group_deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.warning("stage did not stop in time; killing", extra={"stage": child.name})
                    self.on_event(f"{child.name} did not stop in time; killed")
                    child.process.kill()
                    child.process.wait()
            log.info(
                "stopped",
                extra={
                    "stages": [c.name for c in group],
                    "seconds": round(time.monotonic() - group_started, 3),
                },
            )
        for sock in (self.pub, self.control, self.beats):
            if sock is not None:
                sock.close(linger=0)
        for name in ("addresses.json", "launcher.pid"):
            (self.run_dir / name).unlink(missing_ok=True)
        self._release_data_dir()
        self.pub = self.control = self.beats = None
        self.on_event(f"all stages stopped in {time.monotonic() - started:.1f} s")

    def _release_data_dir(self) -> None:
        owner_file = self.config.data_dir / OWNER_FILE
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            return
        if owner.get("pid") == os.getpid() and owner.get("run_dir") == str(self.run_dir.resolve()):
            owner_file.unlink(missing_ok=True)

    def supervise(self, should_stop: Callable[[], bool], on_tick: Callable[[], None] | None = None) -> None:
        """The supervision loop of every entry point: ``step`` until ``should_stop()``, then the
        ordered ``shutdown`` (always, even when a step raised)."""
        try:
            while not should_stop():
                try:
                    self.step()
                except zmq.ZMQError as exc:  # supervision must go on: log, pause, retry
                    log.exception("supervision step failed: %s", exc)
                    time.sleep(0.5)
                if on_tick is not None:
                    on_tick()
        finally:
            self.shutdown()

    def run_forever(self, on_tick: Callable[[], None] | None = None) -> None:
        """Supervise until SIGINT/SIGTERM, then shut down."""
        stop = {"now": False}

        def request_stop(*_args) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        self.supervise(lambda: stop["now"], on_tick)

    def supervise_in_thread(self) -> Supervisor:
        """``supervise`` in a thread (for a caller whose own thread is busy: replay, eval, demo).
        Restarted stages are spawned by that thread, and a child's parent-death signal follows
        the thread that spawned it, so the same thread also runs the shutdown: ``Supervisor.stop``."""
        supervisor = Supervisor(self)
        supervisor.thread.start()
        return supervisor


class Supervisor:
    """``Launcher.supervise`` in a thread; ``stop()`` shuts the system down and waits for it."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=launcher.supervise, args=(self._stop.is_set,), name="omnistream-supervisor", daemon=True
        )

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=self.launcher.config.launcher.stop_timeout_s + 30.0)


def status_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
