"""The CLI's --version and `config show`/`config path`, the folders from platformdirs (XDG_*
honoured, the earlier layout kept), and stage logs rotated by size (stdout/stderr carried along)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import msgspec
import pytest

from omnistream.app.config_view import REDACTED, is_secret, redact, render
from omnistream.app.launcher import Launcher
from omnistream.protocol.config import Config, default_run_dir, load_config
from omnistream.protocol.logs import rotate_if_full

from ..conftest import make_config

ENV_DROP = ("OMNISTREAM_", "XDG_")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_DROP)}
    env.update({"HOME": str(home), "HF_HUB_OFFLINE": "1"}, **extra)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "omnistream.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_names_the_package_python_and_torch() -> None:
    result = cli(dict(os.environ), "--version")
    assert result.returncode == 0, result.stderr
    from importlib.metadata import version

    line = result.stdout.strip()
    assert re.fullmatch(r"omnistream \S+ \(Python 3\.\d+\.\d+, torch \S+\)", line), line
    assert line.startswith(f"omnistream {version('omnistream')} ") and version("torch") in line


def test_xdg_variables_choose_every_folder(short_tmp: Path) -> None:
    x = short_tmp / "x"  # short: the runtime folder holds ipc sockets
    env = clean_env(
        short_tmp / "home",
        XDG_DATA_HOME=str(x / "data"),
        XDG_CACHE_HOME=str(x / "cache"),
        XDG_CONFIG_HOME=str(x / "config"),
        XDG_STATE_HOME=str(x / "state"),
        XDG_RUNTIME_DIR=str(x / "rt"),
    )
    result = cli(env, "config", "show", "--json")
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)["paths"]
    assert paths == {
        "config file": f"{x}/config/omnistream/config.toml",
        "data": f"{x}/data/omnistream",
        "cache": f"{x}/cache/omnistream",
        "keys": f"{x}/config/omnistream/keys",
        "run": f"{x}/rt/omnistream",  # sockets in the runtime folder
        "logs": f"{x}/state/omnistream/log",  # the default run directory's logs
    }
    text = cli(env, "config", "show").stdout
    assert f'data_dir = ""  # -> {x}/data/omnistream' in text
    assert f"# run folder: {x}/rt/omnistream" in text
    assert cli(env, "config", "path").stdout.strip() == f"{x}/config/omnistream/config.toml"


def test_without_xdg_variables_the_folders_are_the_earlier_ones(tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths = json.loads(cli(clean_env(home), "config", "show", "--json").stdout)["paths"]
    assert paths["data"] == f"{home}/.local/share/omnistream"
    assert paths["cache"] == f"{home}/.cache/omnistream"
    assert paths["config file"] == f"{home}/.config/omnistream/config.toml"
    assert paths["keys"] == f"{home}/.config/omnistream/keys"
    assert paths["run"] == f"{home}/.local/share/omnistream/run"  # no XDG_RUNTIME_DIR
    assert paths["logs"] == f"{home}/.local/state/omnistream/log"


def test_a_folder_of_the_earlier_layout_with_data_stays_in_use(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".local" / "share" / "omnistream").mkdir(parents=True)
    env = clean_env(home, XDG_DATA_HOME=str(tmp_path / "new"), XDG_CACHE_HOME=str(tmp_path / "newc"))
    paths = json.loads(cli(env, "config", "show", "--json").stdout)["paths"]
    assert paths["data"] == f"{home}/.local/share/omnistream"  # the new one does not exist yet
    assert paths["cache"] == f"{tmp_path}/newc/omnistream"  # no earlier cache: the XDG one
    (tmp_path / "new" / "omnistream").mkdir(parents=True)
    paths = json.loads(cli(env, "config", "show", "--json").stdout)["paths"]
    assert paths["data"] == f"{tmp_path}/new/omnistream"


def test_config_show_is_the_effective_toml_with_each_values_source(tmp_path: Path) -> None:
    config_dir = tmp_path / "config" / "omnistream"
    config_dir.mkdir(parents=True)
    config_file = config_dir / "config.toml"
    config_file.write_text('[reasoning]\nthreads = 5\nmodel = "from-file"\n[memory]\ntop_k = 3\n')
    env = clean_env(
        tmp_path / "home",
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        OMNISTREAM__MEMORY__TOP_K="4",
    )
    result = cli(
        env,
        "config",
        "show",
        "--set",
        "reasoning.model=qwen2.5-coder-0.5b",
        "--set",
        "launcher.log_backups=7",
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"# config file: {config_file}" in text
    assert "threads = 5  # from " + str(config_file) in text  # the default config file is read
    assert "top_k = 4  # from $OMNISTREAM__MEMORY__TOP_K" in text  # the variable beats the file
    assert 'model = "qwen2.5-coder-0.5b"  # from command line' in text  # --set beats both
    assert "log_backups = 7  # from command line" in text
    assert "max_new_tokens = 96\n" in text  # a default: no note
    shown = msgspec.convert(tomllib.loads(text), Config)  # valid TOML, read back as it was meant
    expected = load_config(
        config_file,
        {"memory.top_k": 4, "reasoning.model": "qwen2.5-coder-0.5b", "launcher.log_backups": 7},
    )
    assert shown == expected
    # --config names another file; a missing one is a usage error that names it
    other = tmp_path / "other.toml"
    other.write_text("[speech]\nthreads = 2\n")
    assert "threads = 2  # from " + str(other) in cli(env, "config", "show", "--config", str(other)).stdout
    missing = cli(env, "config", "show", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml" in missing.stderr


def test_secrets_are_redacted_and_other_values_are_not() -> None:
    assert is_secret("demo.password") and is_secret("api.keys") and is_secret("api.api_token")
    assert is_secret("gateway.client_secret") and is_secret("api.key")
    assert not is_secret("reasoning.max_new_tokens") and not is_secret("memory.synopsis_max_tokens")
    assert not is_secret("gateway.keys_dir") and not is_secret("api.token_file")
    assert redact("api.password", "hunter2") == REDACTED
    assert redact("api.keys", ["k1", "k2"]) == [REDACTED, REDACTED]
    assert redact("api.password", "") == ""  # an empty secret is shown empty
    assert redact("reasoning.max_new_tokens", 96) == 96
    # Every string-valued secret key the configuration has (e.g. an API token) is hidden in `config show`.
    defaults = msgspec.to_builtins(Config())
    secrets = {
        f"{section}.{key}": value
        for section, table in defaults.items()
        if isinstance(table, dict)
        for key, value in table.items()
        if is_secret(f"{section}.{key}") and isinstance(value, str | list)
    }
    overrides = {k: "s3cr3t-value" if isinstance(v, str) else ["s3cr3t-value"] for k, v in secrets.items()}
    text = render(load_config(None, overrides), None, dict.fromkeys(overrides, "command line"))
    assert "s3cr3t-value" not in text
    assert text.count(REDACTED) == len(overrides)


def test_log_dir_is_the_user_log_folder_for_the_default_run_dir_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNISTREAM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = Config()
    assert default_run_dir() == tmp_path / "run"
    assert config.log_dir(tmp_path / "run") == tmp_path / "state" / "omnistream" / "log"
    assert config.log_dir(tmp_path / "other") == tmp_path / "other" / "logs"
    explicit = load_config(None, {"paths.log_dir": str(tmp_path / "mine")})
    assert explicit.log_dir(tmp_path / "run") == explicit.log_dir(tmp_path / "x") == tmp_path / "mine"


ROTATING_STAGE = textwrap.dedent(
    """
    import logging, os, sys
    from omnistream.protocol.logs import setup_logging
    setup_logging("INFO")
    log = logging.getLogger("omnistream.test")
    for index in range(400):
        log.info("line %d", index, extra={"pad": "x" * 40})
    print("stdout after the rotations", flush=True)
    sys.stderr.write("stderr after the rotations\\n")
    sys.stderr.flush()
    os.write(2, b"fd 2 after the rotations\\n")
    """
)


def test_a_stage_log_rotates_by_size_with_its_stdout_and_stderr(tmp_path: Path) -> None:
    """As the launcher runs a stage: stdout and stderr are the log file, the stage's handler
    rotates it; what bypasses logging follows into the new file."""
    log_path = tmp_path / "stage.log"
    env = dict(
        os.environ,
        OMNISTREAM_LOG_FILE=str(log_path),
        OMNISTREAM_LOG_MAX_BYTES="4000",
        OMNISTREAM_LOG_BACKUPS="2",
        OMNISTREAM_LOG_LEVEL="INFO",
    )
    with open(log_path, "ab") as out:
        subprocess.run(
            [sys.executable, "-P", "-c", ROTATING_STAGE], stdout=out, stderr=out, env=env, check=True
        )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["stage.log", "stage.log.1", "stage.log.2"]  # 400 lines of ~200 bytes: many rotations
    for path in tmp_path.iterdir():  # the current file: plus what bypassed logging since
        assert path.stat().st_size <= 4000 + 100 * (path == log_path), (path, path.stat().st_size)
    newest = log_path.read_text()
    assert "stdout after the rotations" in newest and "stderr after the rotations" in newest
    assert "fd 2 after the rotations" in newest
    assert '"msg": "line 399"' in newest and '"msg": "line 0"' not in newest
    older = (tmp_path / "stage.log.1").read_text()
    assert "after the rotations" not in older and '"msg": "line' in older


def test_the_launcher_rotates_a_full_log_and_gives_the_stage_its_limits(short_tmp: Path) -> None:
    log_path = short_tmp / "gateway.log"
    log_path.write_bytes(b"x" * 5000)
    assert not rotate_if_full(log_path, 0, 3)  # 0: never
    assert not rotate_if_full(log_path, 6000, 3)
    assert rotate_if_full(log_path, 5000, 3) and not log_path.exists()
    assert (short_tmp / "gateway.log.1").stat().st_size == 5000

    config = make_config(
        short_tmp, ("gateway",), **{"launcher.log_max_bytes": 600, "launcher.log_backups": 2}
    )
    launcher = Launcher(config, short_tmp / "run")
    assert launcher.log_dir == short_tmp / "run" / "logs"
    launcher.log_dir.mkdir(parents=True)
    (launcher.log_dir / "gateway.log").write_bytes(b"old\n" * 200)  # a full log from an earlier run
    launcher.start()
    try:
        environ = (Path("/proc") / str(launcher.children["gateway"].pid) / "environ").read_bytes()
        variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        assert variables[b"OMNISTREAM_LOG_FILE"] == str(launcher.log_dir / "gateway.log").encode()
        assert variables[b"OMNISTREAM_LOG_MAX_BYTES"] == b"600"
        assert variables[b"OMNISTREAM_LOG_BACKUPS"] == b"2"
    finally:
        launcher.shutdown()
    logs = {p.name: p.read_bytes() for p in launcher.log_dir.glob("gateway.log*")}
    assert set(logs) <= {"gateway.log", "gateway.log.1", "gateway.log.2"}, set(logs)
    assert b'"stage": "gateway"' in logs["gateway.log"]
    for name, content in logs.items():  # the earlier run's full log was moved aside, not appended to
        assert content.startswith(b"old\n") == (content == b"old\n" * 200), name
        assert len(content) <= 800 or content == b"old\n" * 200, (name, len(content))


def test_the_readmes_configuration_example_is_a_valid_config_file(tmp_path: Path) -> None:
    """Every key of README's example is where the config has it (two launcher keys once sat
    under [bus], and a config file copied from it failed to load)."""
    readme = Path(__file__).resolve().parents[2] / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not beside the tests (installed package)")
    [example] = re.findall(r"```toml\n(.*?)```", readme.read_text(), re.S)
    path = tmp_path / "config.toml"
    path.write_text(example)
    config = load_config(path, {})
    assert config.launcher.stop_timeout_s == 30.0 and config.launcher.heartbeat_timeout_s == 120.0
