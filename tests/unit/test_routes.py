"""protocol/routes.py is the conversation: every message type has its rows, the stages and the
gateway are wired from it, and docs/architecture.md shows the same table."""

from __future__ import annotations

import inspect
from pathlib import Path

from omnistream.app import gateway
from omnistream.protocol import messages, routes, runtime

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_every_message_type_has_a_route_on_a_known_channel() -> None:
    types = {
        obj
        for obj in vars(messages).values()
        if inspect.isclass(obj) and issubclass(obj, messages.Message) and obj is not messages.Message
    }
    routed = {route.message for route in routes.ROUTES}
    assert types == routed, (types - routed, routed - types)
    parties = {*routes.STAGES, "client", "launcher", "bus", "*"}
    for route in routes.ROUTES:
        assert route.channel in routes.CHANNELS
        assert set(route.senders) <= parties and set(route.receivers) <= parties, route


def test_the_gateway_and_the_runtime_are_wired_from_the_table() -> None:
    assert set(gateway.CLIENT_REQUESTS) == {
        messages.Ask,
        messages.VideoFrame,
        messages.AudioChunk,
        messages.Interrupt,
        messages.Watch,
        messages.StatusRequest,
        messages.HistoryRequest,
    }
    assert messages.AnswerDelta in gateway.FORWARDED_TO_CLIENTS
    assert messages.Retrieve not in gateway.FORWARDED_TO_CLIENTS  # internal
    assert runtime.MEDIA_TOPICS == (b"VideoFrame",)
    assert set(routes.subscriptions("reasoning")) == {
        messages.Ask,
        messages.DeleteSession,
        messages.Draft,
        messages.Interrupt,
        messages.Record,
        messages.Watch,
    }
    for stage in ("memory", "reasoning", "speech"):
        source = (Path(runtime.__file__).parents[1] / stage / "stage.py").read_text()
        assert f'runtime.subscribe(*subscriptions("{stage}"))' in source, stage


def test_the_architecture_doc_shows_the_table() -> None:
    rows = [
        line
        for line in ARCHITECTURE.read_text().splitlines()
        if line.startswith("| `") and line.count("|") == 6
    ]
    expected = [
        f"| `{r.name}` | {', '.join(r.senders) or '-'} | {', '.join(r.receivers) or '-'} | {r.channel} | {r.why} |"
        for r in routes.ROUTES
    ]
    assert rows == expected
