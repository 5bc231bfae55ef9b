"""Two streams at once on one machine (perception.sources): real processes and default models.

Perception reads two files itself, in real time and at the same time: the bundled recording (a
monarch butterfly, then the handwritten word "Linux") as session "garden" and OpenCV's vtest.avi
(pedestrians on a street) as session "street". Each session's records are stored under its own
name, with what its own video showed and nothing of the other's; a question on each is answered
from its own stream.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.models import prepare_llm_cache
from omnistream.app.replay import DEFAULT_SAMPLE

from ..conftest import make_config

pytestmark = pytest.mark.slow

STREET = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def clips(client: Client) -> list:
    return client.history(kinds=["clip"]).items


def test_two_sources_each_stored_and_answered_as_its_own_session(tmp_path: Path) -> None:
    if not STREET.exists():
        pytest.skip(f"{STREET} is missing (scripts/install.sh installs opencv-doc)")
    run_dir = Path("/tmp") / f"os-streams-{os.getpid()}"
    config = make_config(
        tmp_path,
        ("gateway", "perception", "memory", "reasoning"),
        **{
            "session": "unused",
            "perception.sources": [f"garden={DEFAULT_SAMPLE}", f"street={STREET}"],
            "perception.max_clip_s": 10.0,
            "reasoning.max_new_tokens": 24,
        },
    )
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, run_dir)
    launcher.start()
    supervisor = launcher.supervise_in_thread()
    try:
        with Client.connect(run_dir, session="garden", timeout_s=60) as garden:
            street = Client.connect(run_dir, session="street", timeout_s=60)
            deadline = time.monotonic() + 150
            # the garden recording is 30 s; its last clip closes when its source ends (idle 3 s)
            while time.monotonic() < deadline:
                got_garden, got_street = clips(garden), clips(street)
                if got_garden and got_garden[-1].t1 > 25 and len(got_street) >= 2:
                    break
                time.sleep(1.0)
            garden_text = " ".join(c.text for c in got_garden).lower()
            street_text = " ".join(c.text for c in got_street).lower()
            assert got_garden and got_garden[-1].t1 > 25, [(c.t0, c.t1, c.text) for c in got_garden]
            assert len(got_street) >= 2, [(c.t0, c.t1, c.text) for c in got_street]
            assert "butterfly" in garden_text or "monarch" in garden_text, garden_text
            assert "person" in street_text or "people" in street_text, street_text
            assert "butterfly" not in street_text and "monarch" not in street_text, street_text
            assert "person" not in garden_text and "people" not in garden_text, garden_text
            with Client.connect(run_dir, session="unused", timeout_s=30) as unused:
                assert not clips(unused)  # no source wrote into the configured session

            answer = "".join(garden.ask("Which animal was on screen?", timeout_s=240)).lower()
            assert garden.last_done is not None and not garden.last_done.error, garden.last_done
            assert "butterfly" in answer or "monarch" in answer, answer
            answer = "".join(street.ask("Who was on screen?", timeout_s=240)).lower()
            assert street.last_done is not None and not street.last_done.error, street.last_done
            assert any(word in answer for word in ("people", "person", "pedestrian", "man", "woman")), answer
            assert "butterfly" not in answer, answer
            street.close()
    finally:
        supervisor.stop()
