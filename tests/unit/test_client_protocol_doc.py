"""docs/protocol.md must describe every message a client sends or receives, field by field.

A client in another language is written from that document alone (examples/node was), so a
field added to ``protocol/messages.py`` without documenting it breaks such clients silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from omnistream.app.gateway import CLIENT_REQUESTS, FORWARDED_TO_CLIENTS
from omnistream.protocol.messages import Ack, History, MemoryRecord, Message, Status

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
BASE_FIELDS = {field.name for field in msgspec.structs.fields(Message)}


def sections() -> dict[str, str]:
    """'#### Name' heading -> the text up to the next heading."""
    parts = re.split(r"^#### (\w+)\s*$", DOC.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def client_facing_types() -> list[type]:
    return [*CLIENT_REQUESTS, *FORWARDED_TO_CLIENTS, Ack, Status, History, MemoryRecord]


def test_every_client_facing_field_is_documented() -> None:
    documented = sections()
    missing: list[str] = []
    for message_type in client_facing_types():
        name = message_type.__name__
        if name not in documented:
            missing.append(f"section #### {name}")
            continue
        for field in msgspec.structs.fields(message_type):
            if field.name in BASE_FIELDS:
                continue  # ts/session are described once for all messages
            if f"| `{field.name}` |" not in documented[name]:
                missing.append(f"{name}.{field.name}")
    assert not missing, f"docs/protocol.md lacks: {', '.join(missing)}"


def test_documented_fields_exist_and_required_ones_are_marked() -> None:
    documented = sections()
    for message_type in client_facing_types():
        text = documented[message_type.__name__]
        fields = {f.name: f for f in msgspec.structs.fields(message_type)}
        for row_field, row_default in re.findall(
            r"^\| `(\w+)` \| [^|]+(?:\\\|[^|]+)* \| ([^|]+) \|", text, flags=re.M
        ):
            assert row_field in fields, (
                f"{message_type.__name__}.{row_field} is documented but does not exist"
            )
            required = fields[row_field].required
            assert (row_default.strip() == "required") == required, (
                f"{message_type.__name__}.{row_field}: documented default {row_default.strip()!r}, required={required}"
            )
