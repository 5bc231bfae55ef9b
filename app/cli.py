"""The `omnistream` command line.

Exit codes: 0 success, 1 runtime failure (a stage failed, no answer), 2 bad usage or input
(argparse, unreadable media, bad config), 3 no running system where one is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import msgspec
from rich.console import Console
from rich.table import Table

from omnistream.app.system import running_system
from omnistream.protocol.config import Config, load_config
from omnistream.protocol.logs import setup_logging

EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 1, 2, 3
console = Console(stderr=True)


def _config_file(args: argparse.Namespace) -> str | None:
    """``--config``, else the default config file when it exists (``config.toml`` in the config
    folder, or ``$OMNISTREAM_CONFIG``)."""
    from omnistream.protocol.config import default_config_file

    named = getattr(args, "config", None) or os.environ.get("OMNISTREAM_CONFIG")
    if named and not Path(named).expanduser().is_file():
        console.print(f"[red]no configuration file {named}[/red]")
        raise SystemExit(EXIT_USAGE)
    default = Path(named).expanduser() if named else default_config_file()
    return str(default) if default.is_file() else None


def _config(args: argparse.Namespace) -> Config:
    return load_config(_config_file(args), _overrides(args))


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {}
    for item in getattr(args, "set", None) or []:
        key, _, value = item.partition("=")
        from omnistream.protocol.config import _parse_scalar

        overrides[key] = _parse_scalar(value)
    if getattr(args, "session", None):
        overrides["session"] = args.session
    if getattr(args, "model", None):
        overrides["reasoning.model"] = args.model
    if getattr(args, "source", None):
        sources = [args.source] if isinstance(args.source, str) else list(args.source)
        if len(sources) == 1:  # one: perception.source, the session as named
            overrides["perception.source"] = sources[0]
        else:  # several (--source repeated): each its own session (Config.source_sessions)
            overrides["perception.source"] = ""
            overrides["perception.sources"] = sources
    return overrides


def _run_dir(args: argparse.Namespace) -> Path:
    from omnistream.app.client import default_run_dir

    return Path(args.run_dir) if args.run_dir else default_run_dir()


def _stage_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in rows[0] if rows else ["stage"]:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


# -- commands ---------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from omnistream.app.launcher import Launcher, LaunchError
    from omnistream.app.models import prepare_llm_cache

    config = _config(args)
    try:
        streams = config.source_sessions()
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    if len(streams) > 1:
        from omnistream.perception.live import redact

        console.log("streams: " + ", ".join(f"{session} <- {redact(spec)}" for session, spec in streams))
    if "reasoning" in config.stages:
        prepare_llm_cache(config, progress=not args.json)
    if getattr(args, "ray", None):  # stages placed by Ray across machines (app/cluster.py)
        from omnistream.app.cluster import cmd_up_ray

        return cmd_up_ray(args, config, _run_dir(args), console, _stage_table)
    api = None
    if args.api:  # checked before anything starts: a host beyond loopback needs a token
        from omnistream.app.openai_api import ApiSecurityError, api_endpoint

        try:
            api_host, api_port, api_token = api_endpoint(config)
        except ApiSecurityError as exc:
            console.print(f"[red]{exc}[/red]")
            return EXIT_USAGE
    try:
        launcher = Launcher(config, _run_dir(args), on_event=lambda text: console.log(text))
    except LaunchError as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    try:
        launcher.start()
    except Exception as exc:
        console.print(f"[red]start failed:[/red] {exc}")
        launcher.shutdown()
        return EXIT_FAILURE
    if args.api:
        from omnistream.app.openai_api import ApiThread, create_app

        api = ApiThread(
            create_app(launcher.run_dir, token=api_token, session=config.session), api_host, api_port
        )
        try:
            api.start()
        except RuntimeError as exc:
            console.print(f"[red]{exc} (api.port = {api_port})[/red]")
            launcher.shutdown()
            return EXIT_FAILURE
        console.log(f"OpenAI-compatible API on http://{api_host}:{api_port}/v1")
    try:
        if args.json:
            print(json.dumps(launcher.status_rows()), flush=True)
            launcher.run_forever()
            return 0
        _supervise_with_live_table(launcher)
        return 0
    finally:
        if api is not None:
            api.stop()


def _supervise_with_live_table(launcher) -> None:
    """Supervise until Ctrl-C under a table of the stages (state, restarts, rates) redrawn twice a second."""
    from rich.live import Live

    from omnistream.app.client import Client
    from omnistream.protocol.messages import Stats

    monitor = Client(launcher.addresses)  # only its event socket is read: every stage's Stats
    latest: dict[str, Stats] = {}

    def table() -> Table:
        rows = launcher.status_rows()
        for row in rows:
            stats = latest.get(row["stage"])
            rates = sorted(stats.rates.items()) if stats else []
            row["rates /s"] = ", ".join(f"{k} {v:.1f}" for k, v in rates if v >= 0.05)
        return _stage_table(rows, f"omnistream running in {launcher.run_dir} (Ctrl-C stops everything)")

    with Live(table(), console=console, refresh_per_second=2) as live:

        def refresh() -> None:
            for event in monitor.poll_events(0):
                if isinstance(event, Stats):
                    latest[event.stage] = event
            live.update(table())

        try:
            launcher.run_forever(on_tick=refresh)
        finally:
            monitor.close()


def _remote(args: argparse.Namespace) -> dict:
    """--endpoint / --keys-dir / --key-name: a gateway on another machine, with CURVE keys."""
    return {
        "endpoint": getattr(args, "endpoint", None),
        "keys_dir": Path(args.keys_dir) if getattr(args, "keys_dir", None) else None,
        "key_name": getattr(args, "key_name", None) or "client",
    }


def cmd_keys(args: argparse.Namespace) -> int:
    from omnistream.protocol.security import SecurityError, generate_keys

    keys_dir = Path(args.dir).expanduser() if args.dir else _config(args).keys_dir
    try:
        paths = generate_keys(keys_dir, client=args.client, force=args.force)
    except (SecurityError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    else:
        console.print(f"CURVE keys in {keys_dir} (directory 0700, files 0600):")
        console.print(f"  server public key  {paths['server_public']}  (give to clients)")
        console.print(f"  server secret key  {paths['server_secret']}  (stays here)")
        console.print(
            f"  client {args.client!r} key pair  {paths['client_secret']}  (give to that client only)"
        )
        console.print(f"  authorised         {paths['authorized']}")
        console.print(
            "serve clients beyond loopback: omnistream up --set gateway.host=0.0.0.0; "
            f"a client connects with --endpoint tcp://HOST:PORT --keys-dir DIR holding server.key and {args.client}.key_secret"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from omnistream.app.client import Client, ClientError

    try:
        client = Client.connect(_run_dir(args), timeout_s=args.timeout, **_remote(args))
    except (FileNotFoundError, ClientError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_NOT_RUNNING
    with client:
        status = client.status()
    rows = []
    for name, stats in sorted(status.stages.items()):
        rates = ", ".join(f"{k}={v:.1f}/s" for k, v in sorted(stats.rates.items()) if v)
        counters = ", ".join(f"{k}={v:g}" for k, v in sorted(stats.counters.items()))
        rows.append(
            {"stage": name, "pid": stats.pid, "state": stats.state, "rates": rates, "counters": counters}
        )
    if args.json:
        print(json.dumps({name: msgspec.to_builtins(s) for name, s in status.stages.items()}, indent=1))
    else:
        console.print(_stage_table(rows, "omnistream status"))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from omnistream.app.models import check_models, prepare_llm_cache

    config = _config(args)
    path = prepare_llm_cache(config, progress=not args.json, every_packaged=True)
    results = check_models(
        config,
        on_result=None
        if args.json
        else lambda r: console.log(f"{r.role}: {r.model} ok ({r.seconds}s) {r.detail}"),
    )
    if args.json:
        print(json.dumps({"llm_cache": str(path), "checks": [r.__dict__ for r in results]}, indent=1))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from omnistream.app.client import Client, ClientError

    try:
        client = Client.connect(
            _run_dir(args), session=args.session or "default", timeout_s=args.timeout, **_remote(args)
        )
    except (FileNotFoundError, ClientError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_NOT_RUNNING
    with client:
        try:
            answer = client.ask(
                args.question,
                ts=args.at or 0.0,
                choices=args.choice or [],
                speak=False,
                timeout_s=args.timeout,
            )
            for delta in answer:  # --timeout bounds the whole answer, not only the request
                if not args.json:
                    print(delta, end="", flush=True)
        except ClientError as exc:
            console.print(f"\n[red]{exc}[/red]")
            return EXIT_FAILURE
    done = client.last_done
    if args.json:
        print(json.dumps(msgspec.to_builtins(done)))
    else:
        print()
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Register a standing question with the running system and print its alerts as they fire,
    until Ctrl-C or ``--for`` seconds, then cancel it (``--keep``: it stays stored and keeps firing
    for other clients). The watch id is derived from the session and the condition, so running the
    same watch again replaces it rather than adding one."""
    import hashlib

    from rich.markup import escape

    from omnistream.app.client import Client, ClientError
    from omnistream.app.client_core import Request
    from omnistream.app.launcher import live_run_dir
    from omnistream.protocol.messages import Ack, Alert, Error, Stats, Watch

    session = args.session or "default"
    condition = args.condition.strip()
    run_dir = None
    if not args.endpoint:
        run_dir = Path(args.run_dir) if args.run_dir else live_run_dir(_config(args), None) or _run_dir(args)
    try:
        client = Client.connect(run_dir, session=session, timeout_s=args.timeout, **_remote(args))
    except FileNotFoundError:
        console.print(
            f"[red]no omnistream system is running in {run_dir}: start one with `omnistream up` "
            "(or name its run directory with --run-dir)[/red]"
        )
        return EXIT_NOT_RUNNING
    except (ClientError, ValueError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        return EXIT_NOT_RUNNING
    watch_id = "cli-" + hashlib.sha256(f"{session}\n{condition}".encode()).hexdigest()[:24]

    def register(cancel: bool = False) -> None:
        watch = Watch(ts=0.0, session=session, watch_id=watch_id, condition=condition, cancel=cancel)
        client._request(Request(watch, Ack, watch_id, False, client.timeout_s))  # noqa: SLF001

    with client:
        try:
            register()
        except ClientError as exc:
            console.print(f"[red]watch refused: {escape(str(exc))}[/red]")
            return EXIT_FAILURE
        if not args.json:
            console.print(
                f"watching session {escape(repr(session))} for: {escape(condition)} "
                f"({'Ctrl-C stops' if args.for_s is None else f'for {args.for_s:g} s'})"
            )
        reasoning_pid = 0
        try:
            for event in client.subscribe(Alert, Error, Stats, timeout_s=args.for_s):
                if isinstance(event, Stats):
                    # Watches live in the reasoning stage: after a restart, register again.
                    if event.stage == "reasoning" and event.pid != reasoning_pid:
                        if reasoning_pid:
                            console.log("reasoning restarted: registering the watch again")
                            register()
                        reasoning_pid = event.pid
                elif isinstance(event, Error) and event.request_id == watch_id:
                    reason = escape(f"[{event.code}] {event.message}")
                    console.print(f"[red]watch refused: {reason}[/red]")
                    return EXIT_FAILURE
                elif isinstance(event, Alert) and event.watch_id == watch_id:
                    evidence = event.text.removeprefix(f"{condition}: ").replace("\n", " ")
                    if args.json:
                        print(
                            json.dumps(
                                {
                                    "ts": event.ts,
                                    "session": event.session,
                                    "watch": condition,
                                    "evidence": evidence,
                                }
                            ),
                            flush=True,
                        )
                    else:
                        print(f"[{event.ts:8.1f} s] {condition} | {evidence}", flush=True)
        except KeyboardInterrupt:
            pass
        except ClientError as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
            return EXIT_FAILURE
        if not args.keep:
            try:
                register(cancel=True)
            except (ClientError, KeyboardInterrupt) as exc:
                console.print(f"[yellow]the watch may still be registered: {escape(str(exc))}[/yellow]")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from omnistream.app import config_view

    config_file, overrides = _config_file(args), _overrides(args)
    config = load_config(config_file, overrides)
    origin = config_view.sources(config_file, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.json:
        print(json.dumps(config_view.as_json(config, origin, run_dir), indent=1))
    else:
        print(config_view.render(config, Path(config_file) if config_file else None, origin, run_dir), end="")
    return 0


def cmd_config_path(args: argparse.Namespace) -> int:
    from omnistream.protocol.config import default_config_file, default_paths

    named = args.config or os.environ.get("OMNISTREAM_CONFIG")
    path = Path(named).expanduser() if named else default_config_file()
    if args.json:
        paths = {name: str(p) for name, p in default_paths(_config(args)).items()}
        print(json.dumps({**paths, "config file": str(path), "exists": path.is_file()}, indent=1))
    else:
        print(path)
    return 0


def version_line() -> str:
    """``omnistream X (Python Y, torch Z)`` from the installed packages' metadata (no imports)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"omnistream {of('omnistream')} (Python {platform.python_version()}, torch {of('torch')})"


def cmd_replay(args: argparse.Namespace) -> int:
    from omnistream.app.client import Client
    from omnistream.app.replay import DEFAULT_SAMPLE, Replayer, ScheduledAsk, session_end
    from omnistream.perception.sources import MediaError, MediaReader

    path = Path(args.file) if args.file else DEFAULT_SAMPLE
    try:
        duration = MediaReader(path).duration_s
    except MediaError as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    if args.ask and args.at is None:
        args.at = duration
    asks = [ScheduledAsk(args.at, args.ask)] if args.ask else []
    # A named session resumes (its timeline goes on where its memory stops); without one, each
    # replay is a session of its own, so two replays never share one timeline.
    resume = bool(args.session)
    if not resume:
        args.session = f"replay-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    config = _config(args)
    # Without --run-dir: the running system (the one holding this data, or `omnistream up`'s),
    # else one started for this replay.
    run_dir = Path(args.run_dir) if args.run_dir else None
    results = []
    with (
        running_system(config, run_dir, quiet=args.json) as live_dir,
        Client.connect(live_dir, session=config.session) as client,
    ):

        def on_delta(answer, text: str) -> None:
            if not args.json:
                if answer.text == text:
                    console.print(f"\n[bold]Q ({answer.ask.at_s:.0f} s):[/bold] {answer.ask.question}")
                print(text, end="", flush=True)

        replayer = Replayer(client, on_delta=on_delta, speak=not args.no_speech)
        start_ts = session_end(client) if resume else 0.0
        if start_ts and not args.json:
            console.log(f"session {config.session}: continuing at stream time {start_ts:.1f} s")
        start = time.monotonic()
        answers = replayer.run(path, asks, speed=args.speed, answer_timeout_s=args.timeout, start_ts=start_ts)
        for index, answer in enumerate(answers):
            wav = None
            if answer.audio and args.wav:
                wav = Path(args.wav if len(answers) == 1 else f"{Path(args.wav).stem}-{index + 1}.wav")
                answer.save_wav(wav)
            results.append(
                {
                    "question": answer.ask.question,
                    "at_s": answer.ask.at_s,
                    "answer": answer.done.text if answer.done else answer.text,
                    "error": answer.done.error if answer.done else "no answer",
                    "first_token_s": round(answer.first_delta_wall - answer.sent_wall, 3)
                    if answer.first_delta_wall
                    else None,
                    "first_audio_s": round(answer.first_audio_wall - answer.sent_wall, 3)
                    if answer.first_audio_wall
                    else None,
                    "audio_s": round(sum(len(a) for a in answer.audio) / answer.audio_rate, 2),
                    "wav": str(wav) if wav else None,
                }
            )
        elapsed = time.monotonic() - start
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "session": config.session,
                    "start_ts": start_ts,
                    "run_dir": str(live_dir),
                    "elapsed_s": round(elapsed, 2),
                    "answers": results,
                },
                indent=1,
            )
        )
    else:
        print()
        for result in results:
            if result["wav"]:
                console.print(f"spoken answer: {result['wav']} ({result['audio_s']} s)")
    return EXIT_FAILURE if any(r["error"] for r in results) else 0


def _emit_report(args: argparse.Namespace, report: dict, write_report, markdown) -> int:
    """Write a bench/eval report to ``--out`` (JSON + markdown) and print it (``--json``: the JSON)."""
    json_path, md_path = write_report(report, Path(args.out))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(markdown(report))
        console.print(f"written: {json_path} {md_path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from omnistream.bench import available_suites, markdown, run_suites, write_report

    names = args.suites or available_suites()
    try:
        report = run_suites(
            names, quick=args.quick, progress=lambda text: console.log(text), minutes=args.minutes
        )
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    return _emit_report(args, report, write_report, markdown)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from omnistream.app.client import Client
    from omnistream.app.eval import MODES, EpisodeError, load_episode, markdown, run_eval, write_report

    try:
        episode, _ = load_episode(Path(args.episode))
    except EpisodeError as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        console.print(f"[red]unknown mode {unknown[0]!r} (known: {', '.join(MODES)})[/red]")
        return EXIT_USAGE
    if not args.session:
        args.session = f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    config = _config(args)
    run_dir = Path(args.run_dir) if args.run_dir else None
    with (
        running_system(config, run_dir, quiet=args.json) as live_dir,
        Client.connect(live_dir, session=config.session) as client,
    ):
        bar = tqdm(total=round(episode.duration_s or 0) or None, desc="replay", unit="s", disable=args.json)

        def progress(ts: float, _duration: float) -> None:
            bar.update(max(int(ts) - bar.n, 0))

        report = run_eval(
            client,
            Path(args.episode),
            modes,
            open_ended=not args.no_open,
            speed=args.speed,
            progress=progress,
        )
        bar.close()
    return _emit_report(args, report, write_report, markdown)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from omnistream.app.demo import serve
    except ImportError as exc:
        console.print(f"[red]the demo page needs gradio: .venv/bin/pip install -e '.[demo]' ({exc})[/red]")
        return EXIT_USAGE
    from omnistream.app.client import default_run_dir
    from omnistream.app.demo import DemoSecurityError, demo_auth, demo_password

    config = _config(args)
    if args.password is not None:
        console.print(
            "[red]--password would show the password to every user in the process list: put it in a "
            "file only you can read and pass --password-file FILE, or set $OMNISTREAM_DEMO_PASSWORD[/red]"
        )
        return EXIT_USAGE
    try:
        password = demo_password(args.password_file)
        auth = demo_auth(args.host, password, args.share, user=args.user)
    except DemoSecurityError as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir()
    with running_system(config, run_dir, quiet=args.json) as live_dir:
        url = f"http://{args.host}:{args.port}"
        if args.json:
            print(json.dumps({"url": url, "run_dir": str(live_dir)}), flush=True)
        else:
            login = f" (login: {args.user} and your password)" if auth else ""
            console.print(f"demo page: [bold]{url}[/bold]{login} (Ctrl-C stops)")
        serve(live_dir, host=args.host, port=args.port, open_browser=args.open, auth=auth, share=args.share)
    return 0


def cmd_serve_api(args: argparse.Namespace) -> int:
    from omnistream.app.client import Client, ClientError
    from omnistream.app.openai_api import ApiSecurityError, api_endpoint, create_app, serve

    config = _config(args)
    try:
        host, port, token = api_endpoint(config, args.host, args.port, args.token_file)
    except ApiSecurityError as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_USAGE
    remote = _remote(args)
    try:  # the system must be running, as for `omnistream ask`
        Client.connect(_run_dir(args), session=config.session, timeout_s=args.timeout, **remote).close()
    except (FileNotFoundError, ClientError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        return EXIT_NOT_RUNNING
    app = create_app(
        None if remote["endpoint"] else _run_dir(args),
        token=token,
        session=config.session,
        llm=config.reasoning.model if remote["endpoint"] else "",
        **remote,
    )
    url = f"http://{host}:{port}/v1"
    if args.json:
        print(json.dumps({"url": url, "session": config.session, "token": token is not None}), flush=True)
    else:
        guard = "bearer token required" if token else "no token: this machine only"
        console.print(
            f"OpenAI-compatible API: [bold]{url}[/bold] (session {config.session}; {guard}; Ctrl-C stops)"
        )
    serve(app, host, port)
    return 0


def _delete_live_session(run_dir: Path, session: str, force: bool) -> tuple[bool, str]:
    """Ask the running system's memory to delete ``session``: (deleted, what memory said)."""
    import uuid

    import zmq

    from omnistream.protocol.messages import Ack, DeleteSession
    from omnistream.protocol.sockets import Addresses, make_socket, recv, send

    request = DeleteSession(session=session, request_id=uuid.uuid4().hex, force=force)
    sock = make_socket(zmq.Context.instance(), zmq.DEALER)
    try:
        sock.connect(Addresses.load(run_dir).memory)
        send(sock, request)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sock.poll(100):
                reply = recv(sock)[1]
                if getattr(reply, "request_id", None) == request.request_id:
                    return isinstance(reply, Ack), getattr(reply, "message", "deleted")
        return False, f"the memory stage of the system in {run_dir} did not answer within 30 s"
    finally:
        sock.close(linger=0)


def cmd_sessions(args: argparse.Namespace) -> int:
    """List the stored sessions with their sizes, or delete one (through the running system's
    memory when one runs, else directly in the data directory)."""
    from dataclasses import asdict

    from omnistream.app.launcher import live_run_dir
    from omnistream.memory.retention import delete_session, kv_dirs, usage
    from omnistream.memory.store import MemoryStore
    from omnistream.protocol.text import clock

    config = _config(args)
    db = config.data_dir / "memory.sqlite"
    run_dir = live_run_dir(config, Path(args.run_dir) if args.run_dir else None)
    if args.action == "delete":
        if not args.name:
            console.print("[red]omnistream sessions delete NAME: name the session to delete[/red]")
            return EXIT_USAGE
        if run_dir is not None:
            deleted, said = _delete_live_session(run_dir, args.name, args.force)
            if not deleted:
                console.print(f"[red]not deleted: {said}[/red]")
                return EXIT_FAILURE
        else:
            if not db.exists() and not kv_dirs(config.data_dir, args.name):
                console.print(f"[red]nothing stored in {config.data_dir}[/red]")
                return EXIT_FAILURE
            store = MemoryStore(db, 0)
            try:
                found = delete_session(store, config.data_dir, args.name)
            finally:
                store.close()
            if not found:
                console.print(f"[yellow]no records of session {args.name!r} in {config.data_dir}[/yellow]")
        if args.json:
            print(json.dumps({"deleted": args.name}))
        else:
            console.print(f"session {args.name!r} deleted (records, watches, spilled KV)")
        return 0
    if not db.exists():
        rows = []
    else:
        store = MemoryStore(db, 0)
        try:
            rows = usage(store, config.data_dir)
        finally:
            store.close()
    if args.json:
        print(json.dumps([{**asdict(u), "bytes": u.bytes} for u in rows], indent=1))
        return 0
    if not rows:
        console.print(f"no sessions stored in {config.data_dir}")
        return 0
    table = Table(title=f"sessions in {config.data_dir}")
    for column in ("session", "stream time", "records", "on disk", "last record"):
        table.add_column(column)
    for u in sorted(rows, key=lambda u: -u.last_active):
        table.add_row(
            u.session,
            f"{clock(u.first_ts)}-{clock(u.last_ts)}",
            str(u.records),
            f"{u.bytes / 1e6:.1f} MB",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(u.last_active)) if u.last_active else "-",
        )
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnistream", description="Local real-time video and audio assistant."
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
        p.add_argument("--config", help="TOML configuration file")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config value (e.g. reasoning.model=qwen2.5-coder-0.5b)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if run_dir:
            p.add_argument(
                "--run-dir",
                help="run directory of the system (default: $OMNISTREAM_RUN_DIR, $XDG_RUNTIME_DIR/omnistream "
                "or ~/.local/share/omnistream/run)",
            )

    p = sub.add_parser("up", help="start every stage and supervise them until Ctrl-C")
    common(p)
    p.add_argument("--session", help="session name (resumes its memory)")
    p.add_argument(
        "--model", help="LLM: qwen2.5-coder-1.5b (default), qwen2.5-coder-0.5b or a local model directory"
    )
    p.add_argument(
        "--source",
        action="append",
        help="video the perception process reads itself: camera:0 (webcam), a file or a URL (rtsp://...); "
        "repeat it for several streams, each its own session (SESSION-1, -2, ...; NAME=SPEC names one); "
        "default: frames pushed by clients",
    )
    p.add_argument(
        "--api",
        action="store_true",
        help="also serve the OpenAI-compatible HTTP API (config api.host, api.port, api.token_file)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="place the stages across a Ray cluster (HOST:PORT of its head, or auto): each a Ray actor, "
        "restarted by Ray (pip extra omnistream[cluster]; docs/scaling.md)",
    )
    p.set_defaults(func=cmd_up)

    def remote(p: argparse.ArgumentParser) -> None:
        p.add_argument("--endpoint", help="a gateway on another machine: tcp://HOST:PORT (CURVE keys needed)")
        p.add_argument(
            "--keys-dir", help="CURVE keys (default $OMNISTREAM_KEYS_DIR or ~/.config/omnistream/keys)"
        )
        p.add_argument("--key-name", help="this client's key pair in --keys-dir (default: client)")

    p = sub.add_parser("keys", help="create CURVE keys: the gateway's and an authorised client's")
    common(p, run_dir=False)
    p.add_argument("--dir", help="keys directory (default: gateway.keys_dir or ~/.config/omnistream/keys)")
    p.add_argument("--client", default="client", help="name of the client key pair to add (default: client)")
    p.add_argument("--force", action="store_true", help="also replace the server key pair")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("status", help="health and rates of each stage of the running system")
    common(p)
    remote(p)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("models", help="prepare the packaged models (once) and check that each loads")
    common(p, run_dir=False)
    p.add_argument("--model", help="LLM to prepare")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("ask", help="ask the running system a question; the answer streams to stdout")
    common(p)
    p.add_argument("question")
    p.add_argument("--at", type=float, help="stream time of the question (seconds)")
    p.add_argument(
        "--choice", action="append", help="a multiple-choice option such as 'A a cat' (repeatable)"
    )
    p.add_argument("--session")
    p.add_argument("--timeout", type=float, default=60.0)
    remote(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "watch", help="register a standing question with the running system; its alerts stream to stdout"
    )
    common(p)
    p.add_argument("condition", help='what to be told about, e.g. "tell me when someone enters"')
    p.add_argument("--session", help="session whose stream is watched (default: default)")
    p.add_argument("--for", dest="for_s", type=float, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--keep", action="store_true", help="leave the watch registered when this command ends")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the gateway")
    remote(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("config", help="the configuration in effect, and where it is read from")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    c = config_sub.add_parser(
        "show", help="print the configuration in effect as TOML (secrets redacted), with its sources"
    )
    common(c)
    c.set_defaults(func=cmd_config_show)
    c = config_sub.add_parser("path", help="print the configuration file's location (--json: every folder)")
    common(c, run_dir=False)
    c.set_defaults(func=cmd_config_path)

    p = sub.add_parser(
        "replay",
        help="stream a recording as if live, in a new session (attaches to the running system, "
        "else starts one)",
    )
    common(p)
    p.add_argument("file", nargs="?", help="video/audio file (default: the bundled 30 s sample)")
    p.add_argument("--speed", type=float, default=1.0, help="x real time; 0 = as fast as possible")
    p.add_argument("--ask", help="question to ask during the replay")
    p.add_argument("--at", type=float, help="stream time to ask at (default: the end)")
    p.add_argument("--wav", default="answer.wav", help="where to write the spoken answer")
    p.add_argument("--no-speech", action="store_true", help="text answers only")
    p.add_argument(
        "--session",
        help="session to continue (its timeline goes on where it stopped; default: a new one per replay)",
    )
    p.add_argument("--model", help="LLM to use")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for answers after the stream"
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "eval", help="replay an episode, ask its questions live, score the system and its baselines"
    )
    common(p)
    p.add_argument("episode", help="episode directory (episode.json + video), e.g. ../shared/eval/dev")
    p.add_argument("--speed", type=float, default=1.0, help="x real time (default 1)")
    p.add_argument("--modes", help="comma-separated subset of: full,reprefill,recent,no_memory (default all)")
    p.add_argument("--no-open", action="store_true", help="skip the open-ended (keyword-scored) questions")
    p.add_argument("--session", help="memory session (default: a new one per run)")
    p.add_argument("--model", help="LLM to use")
    p.add_argument("--out", default="eval-results", help="directory for eval.json and eval.md")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo", help="live web page: webcam and microphone in, streamed answers and speech out"
    )
    common(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve the page on (not loopback: a password needed)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--password-file",
        help="require the password in this file (or $OMNISTREAM_DEMO_PASSWORD) to open the page",
    )
    p.add_argument("--password", help=argparse.SUPPRESS)  # refused: visible in the process list
    p.add_argument("--user", default="omnistream", help="login name with a password (default: omnistream)")
    p.add_argument(
        "--share", action="store_true", help="also publish a public gradio.live link (needs a password)"
    )
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument("--session", help="session name for the system started here")
    p.add_argument("--model", help="LLM to use if the system is started here")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "serve-api",
        help="OpenAI-compatible HTTP API for the running system: /v1/chat/completions, /v1/models, /v1/events",
    )
    common(p)
    p.add_argument(
        "--host", help="address to serve on (default api.host: 127.0.0.1; beyond it a token is needed)"
    )
    p.add_argument("--port", type=int, help="port (default api.port: 8000)")
    p.add_argument(
        "--token-file",
        help="file holding the bearer token clients must send (owner-only; default api.token_file, "
        "else $OMNISTREAM_API_TOKEN)",
    )
    p.add_argument("--session", help="session asked about when a request names none (default: default)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the system's gateway")
    remote(p)
    p.set_defaults(func=cmd_serve_api)

    p = sub.add_parser(
        "bench", help="run benchmark suites (kernels, perception, speech, llm, ...); JSON + markdown"
    )
    common(p, run_dir=False)
    p.add_argument("suites", nargs="*", help="suites to run (default: all available)")
    p.add_argument("--quick", action="store_true", help="small sizes, for CI smoke runs")
    p.add_argument(
        "--minutes", type=float, help="soak: stream minutes to replay (default 60; 2 with --quick)"
    )
    p.add_argument("--out", default="bench-results", help="directory for bench.json and bench.md")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sessions", help="list the stored sessions with their sizes, or delete one (records, watches, KV)"
    )
    common(p)
    p.add_argument("action", nargs="?", choices=("list", "delete"), default="list")
    p.add_argument("name", nargs="?", help="the session to delete")
    p.add_argument("--force", action="store_true", help="delete a session that is live (streaming now)")
    p.set_defaults(func=cmd_sessions)
    return parser


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except msgspec.ValidationError as exc:
        console.print(f"[red]bad configuration:[/red] {exc}")
        code = EXIT_USAGE
    except RuntimeError as exc:  # LaunchError: a system could not be started (data in use, ...)
        if type(exc).__name__ != "LaunchError":
            raise
        console.print(f"[red]{exc}[/red]")
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
