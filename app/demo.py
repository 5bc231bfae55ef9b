"""The live demo page (``omnistream demo``): webcam, microphone, typed questions, spoken answers.

A Gradio 6 page that streams the browser's camera (unmirrored RGB frames, 2 per second) and
microphone (0.1 s chunks) to the gateway, or replays a recording instead; shows answers as
they stream with their stream-time citations highlighted; takes standing "watch" requests and shows their alerts; shows
what perception saw next to the camera (a small copy of the frame it analysed last, with the
boxes and labels of the objects detected on it, updated at the detection rate) and the object
tracker's events (who entered, what appeared or is gone, newest first); and shows live stage
stats and a memory timeline (click a row to read the record). Every browser tab gets its own
omnistream session (``DemoSession``).

Spoken answers, to typed and spoken questions alike, play in the page through Web Audio
(``assets/speaker.js``): from page load a feed (``on_speech``) sends every ``AudioOut`` chunk of
the tab's session as it arrives through a hidden textbox, whose change event hands it to the
player; the chunks are scheduled back to back, a barge-in flush drops what is queued at once.
The player's audio context is unlocked by the page's first click or key press (the Record
button, for a user who only talks), as browsers' autoplay policies require.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import gradio as gr
import numpy as np

from omnistream.app.client import ClientError
from omnistream.app.demo_session import MAX_TURNS_SHOWN, DemoSession, Seen, SpeechItem, Turn, clock, safe
from omnistream.app.preview import box_caption, draw_detections, jpeg_data_uri
from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.protocol.messages import Sighting

FRAME_EVERY_S = 0.5
PREVIEW_EVERY_S = 0.5  # how often the page looks for a newer analysed frame or tracker event
# Microphone chunk: the speech stage hears the end of a question only when the chunk holding the
# silence after it arrives (`omnistream bench browser`, BENCHMARKS.md: 0.1 s chunks took 0.43 s off
# the way in against 1 s). 0.5 s: on a busy 2-core machine the page's 0.1 s chunks came through
# Gradio garbled ("what amelon is a little in the scribe"), 0.5 s ones did not.
AUDIO_EVERY_S = 0.5
ANSWER_TIMEOUT_S = 300.0
CUT_GRACE_S = 5.0  # after a barge-in cut an answer's speech, how long to wait for its AnswerDone
SPEECH_WAIT_S = 1.0
SPEECH_RESENT = 16  # chunks (about 40 ms each) repeated in every value of the player feed  # the player feed re-checks that its tab is still open this often
SPEAKER_JS = Path(__file__).resolve().parent / "assets" / "speaker.js"
SPEAKER_IDLE = (
    '<div class="omni-speaker-status">🔈 spoken answers play here (click anywhere to allow sound)</div>'
)
CITATION = re.compile(r"\b(\d{1,2}:\d{2})\b")
STATS_COLUMNS = ["stage", "state", "rates /s", "counters"]
TIMELINE_COLUMNS = ["when", "kind", "text"]
EVENT_COLUMNS = ["when", "event", "what"]
EVENT_WORDS = {"appeared": "appeared", "left": "left", "gone": "gone", "count": "people present"}
NOTHING_SEEN = "<p><em>waiting for perception to see a frame…</em></p>"


def highlight_citations(text: str) -> str:
    """Bold every stream-time citation ("at 02:14") in an answer."""
    return CITATION.sub(r"**\1**", text)


def render_turn(turn: Turn, streaming: bool = False) -> str:
    source = "🎤" if turn.spoken_question else "⌨"
    lines = [f"{source} **{clock(turn.asked_ts)}** {turn.question}", ""]
    body = highlight_citations(turn.text) if turn.text else "…"
    lines.append(body + (" ▌" if streaming and turn.done is None and not turn.flushed else ""))
    if turn.done is not None:
        if turn.done.error == "interrupted":
            lines.append("\n*(interrupted)*")
        elif turn.done.error:
            lines.append(f"\n*answer failed: {turn.done.error}*")
        else:
            lines.append(
                f"\n<sub>first token {turn.done.first_token_s:.1f} s · total {turn.done.total_s:.1f} s"
                + (" · speech stopped (barge-in)" if turn.flushed else "")
                + "</sub>"
            )
    return "\n".join(lines)


def to_mono_float(pcm: np.ndarray) -> np.ndarray:
    """Browser audio (int16 or float, mono or (N, channels)) -> float32 (N,) in [-1, 1]."""
    audio = np.asarray(pcm)
    scale = float(np.iinfo(audio.dtype).max) if np.issubdtype(audio.dtype, np.integer) else 1.0
    audio = audio.astype(np.float32) / scale
    return audio.mean(axis=1, dtype=np.float32) if audio.ndim == 2 else audio


# -- handlers ---------------------------------------------------------------------------------------


def on_frame(frame: np.ndarray | None, link: DemoSession) -> None:
    if frame is not None and link is not None:
        link.push_frame(frame[..., :3])


def on_audio(chunk: tuple[int, np.ndarray] | None, link: DemoSession) -> None:
    if chunk is not None and link is not None:
        sample_rate, pcm = chunk
        audio = to_mono_float(pcm)
        # stamped with the stream time of its first sample: the chunk ends about when it arrives
        ts = max(link.now() - len(audio) / int(sample_rate), 0.0)
        link.push_audio(audio, int(sample_rate), channel="user", ts=ts)


def on_ask(question: str, link: DemoSession):
    """Send a typed question; stream its answer text into the page (its speech comes through
    the player feed, ``on_speech``, as every answer's does)."""
    if not question or not question.strip():
        raise gr.Error("Type a question first.")
    try:
        turn = link.ask(question.strip())
    except ClientError as exc:
        raise gr.Error(str(exc)) from None
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    cut_at = 0.0
    while time.monotonic() < deadline:
        link.wait_for_change(0.2)
        if turn.done is not None:
            break
        if turn.flushed:  # a barge-in cut its speech: reasoning was told to stop as well
            cut_at = cut_at or time.monotonic()
            if time.monotonic() - cut_at > CUT_GRACE_S:
                break
        yield render_turn(turn, streaming=True)
    # The last render never has the streaming cursor: done (answered, failed or interrupted),
    # cut by a barge-in, or out of time.
    late = ""
    if turn.done is None:
        late = "\n\n*(interrupted)*" if turn.flushed else "\n\n*no complete answer in time*"
    yield render_turn(turn) + late


def speech_item(item: SpeechItem) -> dict:
    """One spoken-answer chunk as the player reads it: {"turn", "rate", "pcm": base64 16-bit
    little-endian mono ("" for none), "flush", "final"}."""
    pcm = ""
    if item.pcm is not None and len(item.pcm):
        samples = np.clip(np.asarray(item.pcm, np.float32), -1.0, 1.0) * 32767.0
        pcm = base64.b64encode(samples.astype("<i2").tobytes()).decode("ascii")
    return {"turn": item.turn, "rate": item.sample_rate, "pcm": pcm, "flush": item.flush, "final": item.final}


def speech_payload(items: list[dict], first: int, seq: int) -> str:
    """The player feed's value (``assets/speaker.js``): JSON {"seq": n, "first": i, "items": [...]},
    ``items`` being the chunks numbered ``first``, ``first`` + 1, ... (``speech_item``)."""
    return json.dumps({"seq": seq, "first": first, "items": items}, separators=(",", ":"))


def on_speech(link: DemoSession):
    """The tab's player feed, from page load until the tab goes: the session's spoken-answer
    chunks as soon as they arrive (for spoken questions too: no click needed).

    The page hands each new value of the feed to the player on the textbox's change event, and
    the browser may apply several values before that event runs (they came in one read): only
    the last is seen. So each value repeats the last ``SPEECH_RESENT`` chunks already sent, and
    the player skips the chunk numbers it has played."""
    if link is None:
        return
    seen, seq = link.speech_count, 0
    recent: deque[dict] = deque(maxlen=SPEECH_RESENT)
    while link.running:
        count, items = link.wait_for_speech(seen, SPEECH_WAIT_S)
        seen = count
        if items:
            recent.extend(speech_item(item) for item in items)
            seq += 1
            yield speech_payload(list(recent), count - len(recent), seq)


def on_watch(condition: str, link: DemoSession) -> str:
    if not condition or not condition.strip():
        raise gr.Error("Describe what to watch for, e.g. 'tell me when a person enters'.")
    try:
        link.watch(condition.strip())
    except ClientError as exc:
        raise gr.Error(str(exc)) from None
    return render_alerts(link)


def render_alerts(link: DemoSession) -> str:
    watching = "".join(f"- watching: {c}\n" for c in link.watches.values())
    fired = "".join(f"- 🔔 {a}\n" for a in link.alerts)
    return (watching + fired) or "*no watches yet*"


def stats_rows(link: DemoSession) -> list[list[str]]:
    rows = []
    for name, stats in sorted(link.stats.items()):
        rates = ", ".join(f"{k} {v:.1f}" for k, v in sorted(stats.rates.items()) if v >= 0.05)
        counters = ", ".join(
            f"{k} {v:g}" for k, v in sorted(stats.counters.items()) if not k.endswith(".ready")
        )
        rows.append([name, stats.state, rates, counters])
    return rows or [["(waiting for stats)", "", "", ""]]


def summary(link: DemoSession) -> str:
    memory = link.stats.get("memory")
    stored = memory.counters if memory else {}
    done = [t.done for t in link.turns.values() if t.done is not None and not t.done.error]
    latency = f"{done[-1].first_token_s:.1f} s" if done else "–"
    return (
        f"session `{link.session}` · stream time **{clock(link.now())}** · frames sent "
        f"{link.frames_sent} (dropped {link.client.frames_dropped}) · audio sent {link.audio_sent_s:.0f} s in {link.audio_chunks} chunks · "
        f"memory: {stored.get('clips_stored', 0):g} clips, {stored.get('transcripts_stored', 0):g} transcripts · "
        f"last first-token latency {latency}"
    )


def on_tick(link: DemoSession):
    turns = list(link.turns.values())[-MAX_TURNS_SHOWN:]
    conversation = "\n\n---\n\n".join(render_turn(t, streaming=True) for t in reversed(turns))
    heard = " · ".join(f"{clock(t.t0)} {t.speaker}: {t.text}" for t in list(link.heard)[-3:])
    if link.errors:
        heard += "\n\n" + "\n".join(f"⚠ {e}" for e in link.errors)
    return summary(link), conversation or "*no questions yet*", heard, render_alerts(link), stats_rows(link)


def event_rows(sightings: Iterable[Sighting]) -> list[list[str]]:
    """The tracker's events as the page's rows [when, event, what], in the order given (the
    session keeps them newest first). "when" is when it happened: first seen for an appearance,
    last seen for a departure, the interval for a count of people."""
    rows = []
    for s in sightings:
        if s.event == "count":
            when = f"{clock(s.t0)}–{clock(s.ts)}"
        else:
            when = clock(s.t0 if s.event == "appeared" else s.ts)
        event = "entered" if s.event == "appeared" and s.label == "person" else EVENT_WORDS[s.event]
        rows.append([when, event, s.text])
    return rows or [["", "", "nothing has appeared yet"]]


def render_preview(seen: Seen | None) -> str:
    """The preview panel: the analysed frame with its boxes (inline JPEG) and what was found."""
    if seen is None:
        return NOTHING_SEEN
    image = draw_detections(seen.frame, seen.boxes)
    found = ", ".join(box_caption(box) for box in seen.boxes) or "no objects detected"
    return (
        f'<figure style="margin:0"><img src="{jpeg_data_uri(image)}" width="{image.shape[1]}" '
        f'height="{image.shape[0]}" alt="what perception saw at {clock(seen.ts)}"/>'
        f"<figcaption><small>perception at <b>{clock(seen.ts)}</b>: {html.escape(found)}"
        "</small></figcaption></figure>"
    )


def on_live_view(link: DemoSession):
    """Refresh the preview and the tracker's events, each only when it changed since the last call
    for this tab (``link.live_view_shown``): a skipped output is not sent to the browser."""
    with link.changed:
        seen, version, received = link.seen, link.seen_version, link.sightings_received
        sightings = list(link.sightings)
    last_version, last_received = link.live_view_shown
    link.live_view_shown = (version, received)
    preview = render_preview(seen) if version != last_version else gr.skip()
    events = event_rows(sightings) if received != last_received else gr.skip()
    return preview, events


def on_timeline(link: DemoSession) -> list[list[str]]:
    history = safe(link.history)
    if history is None:
        return [["", "", "memory is not answering"]]
    link.timeline = history.items
    return [
        [
            f"{clock(i.t0)}–{clock(i.t1)}",
            f"speech ({i.speaker})" if i.kind == "transcript" else i.kind,
            i.text[:90],
        ]
        for i in history.items
    ] or [["", "", "nothing remembered yet"]]


def on_timeline_select(link: DemoSession, event: gr.SelectData) -> str:
    items = link.timeline
    row = event.index[0] if isinstance(event.index, list | tuple) else event.index
    if not isinstance(row, int) or not 0 <= row < len(items):
        return ""
    item = items[row]
    return f"**{item.kind} {clock(item.t0)}–{clock(item.t1)}**\n\n{item.text}"


def on_recording(path: str | None, link: DemoSession) -> str:
    target = Path(path) if path else DEFAULT_SAMPLE
    try:
        link.stream_recording(target)
    except Exception as exc:  # MediaError and friends: say which file and why
        raise gr.Error(f"cannot stream {target.name}: {exc}") from None
    return f"streaming **{target.name}** from {clock(link.now())}"


# -- page ---------------------------------------------------------------------------------------------


class Tabs:
    """One ``DemoSession`` per browser tab (Gradio session), made under a lock. A page's first
    events (load, timers, camera and microphone streams) arrive together: a ``gr.State`` factory
    raced, made a session per racing event and kept one, so the spoken-answer feed started at
    load could watch a session that the microphone never streamed into (and the others leaked)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.lock = threading.Lock()
        self.links: dict[str, DemoSession] = {}

    def __call__(self, request: gr.Request) -> DemoSession:
        key = request.session_hash or ""
        with self.lock:
            link = self.links.get(key)
            if link is None or not link.running:
                link = self.links[key] = DemoSession(self.run_dir)
            return link

    def close(self, request: gr.Request) -> None:
        with self.lock:
            link = self.links.pop(request.session_hash or "", None)
        if link is not None:
            link.close()


def build_page(
    run_dir: Path, audio_every_s: float = AUDIO_EVERY_S, frame_every_s: float = FRAME_EVERY_S
) -> gr.Blocks:
    """The page, talking to the system whose run directory is ``run_dir``; the browser sends a
    microphone chunk every ``audio_every_s`` and a camera frame every ``frame_every_s``."""
    tabs = Tabs(run_dir)

    # Gradio hands each handler the tab's request (annotated gr.Request): its session comes from it.
    def frame_in(frame: np.ndarray | None, request: gr.Request) -> None:
        on_frame(frame, tabs(request))

    def audio_in(chunk: tuple[int, np.ndarray] | None, request: gr.Request) -> None:
        on_audio(chunk, tabs(request))

    def ask_in(question: str, request: gr.Request):
        yield from on_ask(question, tabs(request))

    def speech_out(request: gr.Request):
        yield from on_speech(tabs(request))

    def stop_in(request: gr.Request) -> None:
        tabs(request).interrupt()

    def watch_in(condition: str, request: gr.Request) -> str:
        return on_watch(condition, tabs(request))

    def recording_in(path: str | None, request: gr.Request) -> str:
        return on_recording(path, tabs(request))

    def tick(request: gr.Request):
        return on_tick(tabs(request))

    def timeline_tick(request: gr.Request) -> list[list[str]]:
        return on_timeline(tabs(request))

    def live_view_tick(request: gr.Request):
        return on_live_view(tabs(request))

    def timeline_row(event: gr.SelectData, request: gr.Request) -> str:
        return on_timeline_select(tabs(request), event)

    with gr.Blocks(title="omnistream") as page:
        gr.Markdown("# omnistream — live")
        status = gr.Markdown(elem_id="summary")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    camera = gr.Image(
                        sources=["webcam"],
                        streaming=True,
                        type="numpy",
                        label="Camera",
                        webcam_options=gr.WebcamOptions(mirror=False),
                        elem_id="camera",
                        scale=1,
                    )
                    with gr.Column(scale=1, min_width=200):
                        gr.Markdown("**What perception saw**")
                        preview = gr.HTML(NOTHING_SEEN, elem_id="preview")
                events = gr.Dataframe(
                    value=event_rows([]),
                    headers=EVENT_COLUMNS,
                    label="In view: what appeared and left (newest first)",
                    elem_id="events",
                    interactive=False,
                    max_height=260,
                )
                mic = gr.Audio(
                    sources=["microphone"], streaming=True, type="numpy", label="Microphone", elem_id="mic"
                )
                with gr.Accordion("…or stream a recording instead", open=False):
                    upload = gr.File(label="video file", file_types=["video", "audio"], type="filepath")
                    play = gr.Button("Stream it (or the bundled sample)", elem_id="play-recording")
                    playing = gr.Markdown()
            with gr.Column(scale=1):
                question = gr.Textbox(
                    label="Ask", placeholder="What is on screen right now?", elem_id="question"
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop answer", elem_id="stop")
                answer = gr.Markdown(elem_id="answer")
                gr.HTML(SPEAKER_IDLE, elem_id="speaker", label="Spoken answer")
                feed = gr.Textbox(visible="hidden", elem_id="speech-feed")
                heard = gr.Markdown(elem_id="heard")
                with gr.Row():
                    watch_text = gr.Textbox(
                        label="Watch for", placeholder="tell me when a person enters", scale=3
                    )
                    watch = gr.Button("Watch", scale=1, elem_id="watch")
                alerts = gr.Markdown(elem_id="alerts")
        with gr.Accordion("Conversation (typed and spoken questions, newest first)", open=True):
            conversation = gr.Markdown(elem_id="conversation")
        stats = gr.Dataframe(headers=STATS_COLUMNS, label="Stages (live)", elem_id="stats", interactive=False)
        with gr.Row():
            timeline = gr.Dataframe(
                headers=TIMELINE_COLUMNS,
                label="Memory timeline (click a row)",
                elem_id="timeline",
                interactive=False,
                scale=2,
            )
            detail = gr.Markdown(elem_id="detail")

        camera.stream(
            frame_in,
            [camera],
            None,
            stream_every=frame_every_s,
            concurrency_limit=None,
            show_progress="hidden",
        )
        mic.stream(
            audio_in,
            [mic],
            None,
            stream_every=audio_every_s,
            # Every chunk, one at a time, in order: handled in parallel, 0.1 s chunks overtook
            # each other (whisper heard "what animdominal is on the screen"); with Gradio's
            # default trigger mode ("once") a chunk arriving while one is handled was dropped.
            concurrency_limit=1,
            trigger_mode="multiple",
            show_progress="hidden",
        )
        for trigger in (ask.click, question.submit):
            trigger(ask_in, [question], [answer], concurrency_limit=None, show_progress="hidden")
        page.load(speech_out, None, [feed], concurrency_limit=None, show_progress="hidden")
        feed.change(None, [feed], None, js="(value) => { window.omniSpeaker?.feed(value); }")
        page.unload(tabs.close)
        stop.click(stop_in, None, None)
        watch.click(watch_in, [watch_text], [alerts])
        play.click(recording_in, [upload], [playing])
        gr.Timer(1.0).tick(tick, None, [status, conversation, heard, alerts, stats], show_progress="hidden")
        gr.Timer(5.0).tick(timeline_tick, None, [timeline], show_progress="hidden")
        gr.Timer(PREVIEW_EVERY_S).tick(live_view_tick, None, [preview, events], show_progress="hidden")
        timeline.select(timeline_row, None, [detail])
    page.tabs = tabs  # the page's sessions (tests, and a clean exit)
    return page


def _stop(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


class DemoSecurityError(ValueError):
    pass


def demo_password(path: str | None) -> str:
    """The demo page's password: the first line of ``path`` (``--password-file``), else
    ``$OMNISTREAM_DEMO_PASSWORD``, else "" (none). Never a command-line argument: every user sees
    those in the process list. A file that others can read is refused."""
    if not path:
        return os.environ.get("OMNISTREAM_DEMO_PASSWORD", "")
    file = Path(path).expanduser()
    try:
        if file.stat().st_mode & 0o077:
            raise DemoSecurityError(f"{file} can be read by other users: chmod 600 it")
        lines = file.read_text().splitlines()
    except OSError as exc:
        raise DemoSecurityError(f"cannot read the password file {file}: {exc.strerror}") from None
    return lines[0].strip() if lines else ""


def demo_auth(host: str, password: str, share: bool, user: str = "omnistream") -> tuple[str, str] | None:
    """The page's login: none on loopback without a password; a password is required to serve
    beyond loopback or to share publicly (raises ``DemoSecurityError`` otherwise)."""
    from omnistream.protocol.security import is_loopback

    if password:
        if len(password) < 8:
            raise DemoSecurityError("the demo password must have at least 8 characters")
        return (user, password)
    if share:
        raise DemoSecurityError("--share publishes the page on the internet: set --password-file too")
    if not is_loopback(host):
        raise DemoSecurityError(
            f"--host {host} serves the page beyond this machine: set --password-file (or $OMNISTREAM_DEMO_PASSWORD)"
        )
    return None


def serve(
    run_dir: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    open_browser: bool = False,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    audio_every_s: float = AUDIO_EVERY_S,
    frame_every_s: float = FRAME_EVERY_S,
) -> None:
    """Serve the page until Ctrl-C or SIGTERM (both end in a clean shutdown). Never shared
    publicly unless ``share``; behind a login when ``auth`` is (user, password)."""
    signal.signal(signal.SIGTERM, _stop)
    page = build_page(run_dir, audio_every_s, frame_every_s)
    page.queue(default_concurrency_limit=None).launch(
        head=f"<script>{SPEAKER_JS.read_text()}</script>",
        server_name=host,
        server_port=port,
        inbrowser=open_browser,
        show_error=True,
        quiet=True,
        share=share,
        auth=auth,
        auth_message="omnistream: log in with the demo password" if auth else None,
    )
