"""`omnistream config show`: the configuration in effect, as TOML (the config file's format), with
where each value that differs from its default came from, the folders it resolves to, and
secrets (passwords, tokens, API keys) redacted."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec

from omnistream.protocol.config import Config, config_values, default_paths

REDACTED = "<redacted>"
# A key is secret when one of its words (split at "_") is one of these, e.g. demo_password,
# api_token, client_secret, api.keys; max_tokens is not (its word is "tokens").
_SECRET_WORDS = frozenset(
    {"password", "passwd", "passphrase", "secret", "token", "apikey", "credential", "credentials"}
    | {"key", "keys", "auth"}
)
# Keys whose value names a folder or file, not a secret (keys_dir, a token_file...).
_PATH_SUFFIXES = ("_dir", "_file", "_path")
# Config keys that name folders: show what an empty value resolves to.
_RESOLVED = {
    "paths.data_dir": "data",
    "paths.cache_dir": "cache",
    "paths.log_dir": "logs",
    "gateway.keys_dir": "keys",
}


def is_secret(dotted: str) -> bool:
    leaf = dotted.rsplit(".", 1)[-1].lower()
    if leaf.endswith(_PATH_SUFFIXES):
        return False
    return not _SECRET_WORDS.isdisjoint(leaf.split("_"))


def redact(dotted: str, value: Any) -> Any:
    """``value`` with its secret content hidden (an empty secret stays visible as empty)."""
    if not is_secret(dotted) or value in ("", None, [], (), {}) or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [REDACTED for _ in value]
    if isinstance(value, dict):
        return {key: REDACTED for key in value}
    return REDACTED


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def sources(path: str | Path | None, overrides: dict[str, Any] | None) -> dict[str, str]:
    """Dotted key -> where its value came from (the last of file, variable, command line to set it)."""
    return {dotted: source for dotted, _value, source in config_values(path, overrides)}


def render(
    config: Config,
    config_file: Path | None = None,
    origin: dict[str, str] | None = None,
    run_dir: Path | None = None,
) -> str:
    """The configuration as TOML that ``load_config`` reads back (secrets redacted)."""
    origin = origin or {}
    values, defaults = msgspec.to_builtins(config), msgspec.to_builtins(Config())
    paths = default_paths(config, run_dir)
    lines = ["# omnistream configuration in effect: defaults < config file < $OMNISTREAM__* < command line"]
    if config_file is not None:
        lines.append(f"# config file: {config_file}")
    else:
        lines.append(f"# config file: none ({paths['config file']} does not exist)")
    lines += [f"# {name} folder: {path}" for name, path in paths.items() if name != "config file"]

    def line(dotted: str, key: str, value: Any, default: Any) -> str:
        text = f"{key} = {toml_value(redact(dotted, value))}"
        notes = []
        if value != default:
            notes.append(f"from {origin.get(dotted, 'the config file')}")
        if dotted in _RESOLVED and not value:
            notes.append(f"-> {paths[_RESOLVED[dotted]]}")
        return f"{text}  # {'; '.join(notes)}" if notes else text

    def table(prefix: str, values: dict[str, Any], defaults: dict[str, Any]) -> None:
        for key, value in values.items():
            if value is None:  # TOML has no null: the default (unset) stays out
                lines.append(f"# {key}: unset")
            elif not isinstance(value, dict):
                lines.append(line(f"{prefix}{key}", key, value, defaults.get(key)))
        for key, value in values.items():
            if isinstance(value, dict):
                lines.extend(["", f"[{prefix}{key}]"])
                table(f"{prefix}{key}.", value, defaults.get(key) or {})

    lines.append("")
    table("", values, defaults)
    return "\n".join(lines) + "\n"


def as_json(config: Config, origin: dict[str, str], run_dir: Path | None = None) -> dict[str, Any]:
    """``--json``: the configuration (secrets redacted), the folders, the non-default values' sources."""

    def redacted(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
        return {
            key: redacted(f"{prefix}{key}.", value)
            if isinstance(value, dict)
            else redact(prefix + key, value)
            for key, value in values.items()
        }

    values = redacted("", msgspec.to_builtins(config))
    paths = {name: str(path) for name, path in default_paths(config, run_dir).items()}
    return {"config": values, "paths": paths, "sources": origin}
