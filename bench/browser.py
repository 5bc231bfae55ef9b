"""`omnistream bench browser`: the demo page's own round trip, in headless Chromium.

A user who only talks: the fake microphone (``--use-file-for-fake-audio-capture``) speaks a
question with the real TTS voice, then stays silent for ``PERIOD_S`` and repeats (Chromium loops
the file); the fake camera plays the bundled sample. The page is opened, the camera started and
Record clicked, nothing else. Measured in the page, on one clock (``performance.now()``):

- end of the question: an analyser on the same microphone stream (``MIC_TAP_JS``, wrapped
  around ``getUserMedia``) notes the last loud 5 ms window before 0.4 s of quiet;
- first answer audio playing: the page's player (``app/assets/speaker.js``) notes when the
  answer's first chunk starts to play (and, reported too, when an analyser on its output first
  hears it: the voice opens each answer with about 0.3 s of silence).

The system runs with every stage and the configured models (``reasoning.model``; default 1.5B).
Rows: end of question -> first answer audio playing, p50 / p95, for the page's microphone chunk
(``demo.AUDIO_EVERY_S``) and, as the baseline, the 1 s chunks it had before, each against a fresh
page process; then (``bench speech``'s figure for the same model, measured here after the system
is stopped) end of speech -> first ``AudioOut`` sent inside the speech stage, with the LLM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
QUESTION = "How many people are on the screen right now?"
PERIOD_S = 18.0  # one question per loop of the fake microphone file
LOUD_RMS = 0.02
QUIET_MS = 400

# Taps every microphone stream the page opens (the newest one counts): notes when speech starts
# and the last loud window before QUIET_MS of quiet (omniMic.starts / .ends, performance.now()).
MIC_TAP_JS = f"""
(() => {{
  const M = (window.omniMic = {{ starts: [], ends: [], taps: 0 }});
  const original = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {{
    const stream = await original(constraints);
    if (stream.getAudioTracks().length) tap(stream);
    return stream;
  }};
  function tap(stream) {{
    const id = ++M.taps;
    const ctx = new AudioContext();
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 256;
    ctx.createMediaStreamSource(stream).connect(analyser);
    const data = new Float32Array(analyser.fftSize);
    let state = "unknown", lastLoud = 0;
    const timer = setInterval(() => {{
      if (M.taps !== id) {{ clearInterval(timer); ctx.close(); return; }}
      analyser.getFloatTimeDomainData(data);
      let sum = 0;
      for (const v of data) sum += v * v;
      const now = performance.now();
      if (Math.sqrt(sum / data.length) > {LOUD_RMS}) {{
        if (state === "quiet") {{ state = "speech"; M.starts.push(now); }}
        lastLoud = now;
      }} else if (state === "unknown" && now - lastLoud > {QUIET_MS}) {{
        state = "quiet";  // a question already under way when the tap began does not count
      }} else if (state === "speech" && now - lastLoud > {QUIET_MS}) {{
        state = "quiet";
        M.ends.push(lastLoud);
      }}
    }}, 5);
  }}
}})();
"""

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_page(
    run_dir: Path, port: int, log_path: Path, audio_every_s: float | None = None, timeout_s: float = 120.0
) -> subprocess.Popen:
    """The demo page (``demo.serve``) in its own process on ``port``, up and answering; with
    ``audio_every_s``, that microphone chunk instead of the page's."""
    chunk = "" if audio_every_s is None else f", audio_every_s={audio_every_s!r}"
    code = (
        "from pathlib import Path; from omnistream.app.demo import serve; "
        f"serve(Path({str(run_dir)!r}), port={port}{chunk})"
    )
    process = subprocess.Popen(
        [sys.executable, "-P", "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "wb"),  # noqa: SIM115 - owned by the child
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo page exited with code {process.returncode} (log: {log_path})")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the demo page did not come up at {url} (log: {log_path})")


def stop_page(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def launch_chromium(playwright, camera: Path, microphone: Path, autoplay_without_gesture: bool = False):
    """Headless Chromium with ``camera`` (Y4M) and ``microphone`` (WAV) as its devices. Sound
    needs a user gesture (the default policy) unless ``autoplay_without_gesture``."""
    args = CHROMIUM_ARGS + [
        f"--use-file-for-fake-video-capture={camera}",
        f"--use-file-for-fake-audio-capture={microphone}",
    ]
    if autoplay_without_gesture:
        args.append("--autoplay-policy=no-user-gesture-required")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)


def open_voice_page(browser, url: str, console: list[str] | None = None, camera_timeout_ms: int = 60_000):
    """A new tab on the page as a user who only talks: camera started, Record clicked (the only
    gesture: it must be what lets the answers play), microphone tapped (``MIC_TAP_JS``); the
    page's console messages and errors go to ``console``."""
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    if console is not None:
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    page.add_init_script(MIC_TAP_JS)
    page.goto(url)
    page.wait_for_selector("#summary code", timeout=60_000)
    page.get_by_text("Click to Access Webcam").click()
    page.locator("#camera button[aria-label='capture photo']").click(timeout=camera_timeout_ms)
    page.locator("#mic button.record-button").click()
    return page


def answered(page, sound: bool = False) -> tuple[list[tuple[float, float]], int]:
    """([(end of a question in the microphone, start of the answer that followed it)] as
    wall-clock seconds (``time.time()``'s clock), questions that ended with no answer before the
    next one began). The start is when the answer's first chunk begins to play; with ``sound``,
    when the player's output analyser first hears it (the voice opens with ~0.3 s of silence)."""
    mic, starts_at, origin = page.evaluate(
        f"() => [window.omniMic, Object.values(window.omniSpeaker.{'heard' if sound else 'scheduled'}),"
        " performance.timeOrigin]"
    )
    ends, starts, answers = mic["ends"], mic["starts"], sorted(starts_at)
    pairs, missed = [], 0
    for end in ends:
        following = [s for s in starts if s > end]
        until = following[0] if following else float("inf")
        answer = next((h for h in answers if end < h < until), None)
        if answer is not None:
            pairs.append(((origin + end) / 1000.0, (origin + answer) / 1000.0))
        elif following:
            missed += 1
    return pairs, missed


def round_trips(page) -> tuple[list[float], int]:
    """(seconds from each end of a question in the microphone to the first sound of its answer,
    questions with no answer heard)."""
    pairs, missed = answered(page, sound=True)
    return [heard - end for end, heard in pairs], missed


def measure(
    browser, url: str, trials: int, progress: Callable[[str], None], timeout_s: float
) -> tuple[list[tuple[float, float]], list[tuple[float, float]], int, str]:
    """``trials`` questions answered on a fresh tab (the tab's first is left out: the page's
    stream is still starting); returns ((end, first chunk playing) pairs, (end, first sound)
    pairs, missed answers, the page's summary)."""
    page = open_voice_page(browser, url)
    try:
        deadline = time.monotonic() + timeout_s
        shown = 0
        while True:
            pairs, missed = answered(page)
            if len(pairs) != shown:
                shown = len(pairs)
                progress(f"browser: round trip {shown}: {(pairs[-1][1] - pairs[-1][0]) * 1000:.0f} ms")
            if len(pairs) >= trials + 1 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        summary = page.locator("#summary").inner_text()
        heard, _ = answered(page, sound=True)
        return pairs[1:], heard[1:], missed, summary
    finally:
        page.close()


STAGE_SPAN = "last speech window -> first AudioOut sent (speech stage + LLM)"
LLM_WAIT = "Ask -> first AnswerDelta (LLM first token)"


def stage_turns(speech_log: Path) -> list[tuple[float, dict]]:
    """The speech stage's logged turn latencies: (wall time of the first AudioOut, spans in ms)."""
    turns = []
    for line in speech_log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "turn latency (ms)" and STAGE_SPAN in record.get("spans", {}):
            turns.append((float(record["ts"]), record["spans"]))
    return turns


def breakdown(pairs: list[tuple[float, float]], turns: list[tuple[float, dict]]) -> dict[str, list[float]]:
    """Each round trip split at the speech stage's own marks (its log, same machine clock):
    before (microphone -> page -> gateway -> the stage's last speech window: chunking, upload,
    VAD lag), inside (last speech window -> first AudioOut sent; of which the wait for the LLM's
    first token) and after (AudioOut sent -> gateway -> page -> playing)."""
    parts: dict[str, list[float]] = {"round trip": [], "before": [], "stage": [], "llm": [], "after": []}
    for end, heard in pairs:
        parts["round trip"].append(heard - end)
        turn = next(((ts, spans) for ts, spans in turns if end < ts < heard), None)
        if turn is None:
            continue
        ts, spans = turn
        stage = spans[STAGE_SPAN] / 1000.0
        parts["before"].append(ts - stage - end)
        parts["stage"].append(stage)
        parts["llm"].append(spans.get(LLM_WAIT, 0.0) / 1000.0)
        parts["after"].append(heard - ts)
    return parts


def percentiles(name: str, values: list[float], **extra) -> list[dict]:
    if not values:
        return [{"name": f"{name}: no answer heard", "value": None, "unit": "ms", **extra}]
    array = np.asarray(values) * 1000.0
    return [
        {
            "name": f"{name} p{q}",
            "value": float(np.percentile(array, q)),
            "unit": "ms",
            "n": len(values),
            **extra,
        }
        for q in (50, 95)
    ]


def speech_baseline(trials: int, progress: Callable[[str], None]) -> dict[str, list[float]]:
    """``bench speech``'s end of speech -> first AudioOut sent with the configured LLM ("total"),
    and its first part, end of speech -> the VAD's last speech window ("vad")."""
    from omnistream.bench import speech, speech_turns
    from omnistream.protocol.config import SpeechConfig
    from omnistream.speech.asr import Recognizer
    from omnistream.speech.speak import Voice

    clips = speech.librivox()
    llm = speech_turns.LLM(progress)
    try:
        driver = speech.Driver(Recognizer("tiny.en"), Voice("heart"), SpeechConfig())
        try:
            results = speech_turns.turn_trials(
                driver, clips, trials, speech.voiced_span, speech.captured_at, progress, llm
            )
        finally:
            driver.stage.close()
    finally:
        llm.close()
    return {
        "total": [r["end of user speech -> first AudioOut sent"] for r in results],
        "vad": [r["end of user speech -> VAD's last speech window (VAD lag)"] for r in results],
    }


def fake_camera(
    path: Path, seconds: float = 12.0, width: int = 320, height: int = 180, fps: int = 10
) -> Path:
    """The first ``seconds`` of the bundled sample (the butterfly photo) as a 4:2:0 Y4M file
    (Chromium's ``--use-file-for-fake-video-capture`` loops it as a webcam)."""
    import av

    from omnistream.app.replay import DEFAULT_SAMPLE

    with av.open(str(DEFAULT_SAMPLE)) as container, open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        stream = container.streams.video[0]
        written = 0
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= seconds:
                break
            planes = frame.reformat(width=width, height=height, format="yuv420p").to_ndarray()
            out.write(b"FRAME\n" + np.ascontiguousarray(planes, np.uint8).tobytes())
            written += 1
    if not written:
        raise ValueError(f"no video frames decoded from {DEFAULT_SAMPLE}")
    return path


def fake_microphone(path: Path, question: str, silence_after_s: float = 400.0, rate: int = 16000) -> Path:
    """``question`` spoken by the real TTS voice after 1 s of silence, then silence (Chromium's
    ``--use-file-for-fake-audio-capture`` loops the file: the silence must outlast an answer, or
    the repeated question interrupts it, a barge-in)."""
    import soundfile

    from omnistream.speech.speak import Voice

    speech = Voice().synthesize(question, sample_rate=rate).astype(np.float32)
    speech *= 0.8 / max(float(np.abs(speech).max()), 1e-6)
    pcm = np.concatenate(
        [np.zeros(rate, np.float32), speech, np.zeros(int(silence_after_s * rate), np.float32)]
    )
    soundfile.write(str(path), pcm, rate, subtype="PCM_16")
    return path


def run(quick: bool, progress: Callable[[str], None]) -> list[dict]:
    """The page's microphone chunk and the 1 s one before it, one after the other on one running
    system (each with its own page process and browser), then the speech-stage baseline."""
    import soundfile
    from playwright.sync_api import sync_playwright

    from omnistream.app import demo
    from omnistream.app.launcher import Launcher
    from omnistream.protocol.config import load_config

    trials = 5 if quick else 10
    chunks = [demo.AUDIO_EVERY_S, 1.0]
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    parts: dict[float, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="omni-browser-") as tmp:
        root = Path(tmp)
        progress("browser: making the fake camera and microphone")
        camera = fake_camera(root / "camera.y4m")
        microphone = fake_microphone(root / "microphone.wav", QUESTION, silence_after_s=0.0)
        spoken_s = soundfile.info(str(microphone)).duration
        microphone = fake_microphone(root / "microphone.wav", QUESTION, silence_after_s=PERIOD_S - spoken_s)
        config = load_config(None, {"paths.data_dir": str(root / "data")})
        model = config.reasoning.model
        launcher = Launcher(config, Path("/tmp") / f"os-bb-{os.getpid()}")
        progress(f"browser: starting the system (LLM {model})")
        launcher.start()
        try:
            with sync_playwright() as playwright:
                for chunk in chunks:
                    port = free_port()
                    page_process = start_page(launcher.run_dir, port, root / f"demo-{chunk}.log", chunk)
                    browser = launch_chromium(playwright, camera, microphone)
                    try:
                        progress(f"browser: {trials} questions, microphone chunks of {chunk} s")
                        pairs, heard, missed, summary = measure(
                            browser,
                            f"http://127.0.0.1:{port}",
                            trials,
                            progress,
                            (trials + 3) * PERIOD_S + 60,
                        )
                    finally:
                        browser.close()
                        stop_page(page_process)
                    parts[chunk] = breakdown(pairs, stage_turns(launcher.log_dir / "speech.log"))
                    parts[chunk]["sound"] = [h - e for e, h in heard]
                    progress(f"browser: chunks of {chunk} s: {summary}")
                    if missed:
                        rows.append(
                            {
                                "name": f"questions with no answer heard, {chunk} s chunks",
                                "value": missed,
                                "unit": "questions",
                            }
                        )
        finally:
            launcher.shutdown()
    page_chunk, before = chunks
    names = {
        "round trip": f"browser: end of the spoken question in the microphone -> first answer audio playing, LLM {model}",
        "before": "... of which microphone -> page -> gateway -> speech stage's last speech window (chunks, upload, VAD lag)",
        "stage": "... of which speech stage's last speech window -> first AudioOut sent (ASR, LLM, TTS)",
        "llm": "...... of which Ask -> first AnswerDelta (the LLM's queue and first token)",
        "after": "... of which first AudioOut sent -> gateway -> page -> playing",
        "sound": "end of the spoken question -> first answer sound heard in the page (the voice's leading silence on top)",
    }
    for part, name in names.items():
        base = np.asarray(parts[before][part]) * 1000.0
        for row in percentiles(f"{name}, microphone chunks of {page_chunk} s", parts[page_chunk][part]):
            if len(base) and row["value"] is not None:
                row["baseline_name"] = f"microphone chunks of {before} s (the page before)"
                row["baseline"] = float(np.percentile(base, int(row["name"][-2:])))
            rows.append(row)
    progress("browser: bench speech's end of speech -> first AudioOut, same LLM (system stopped)")
    speech = speech_baseline(5 if quick else 10, progress)
    rows += percentiles(
        f"bench speech: end of user speech -> first AudioOut sent (inside the speech stage), LLM {model}",
        speech["total"],
    )
    rows += percentiles(
        "bench speech: ... of which end of user speech -> VAD's last speech window", speech["vad"]
    )
    now = parts[page_chunk]
    if now["round trip"] and speech["total"]:
        rows.append(
            {
                "name": "browser round trip p50 minus bench speech end of speech -> first AudioOut p50",
                "value": float(np.median(now["round trip"]) - np.median(speech["total"])) * 1000.0,
                "unit": "ms",
            }
        )
    if now["before"] and speech["vad"]:
        own = np.median(now["before"]) + np.median(now["after"]) - np.median(speech["vad"])
        rows.append(
            {
                "name": "the page's own share p50: (microphone -> speech stage) + (AudioOut -> playing) minus bench speech's VAD lag",
                "value": float(own) * 1000.0,
                "unit": "ms",
            }
        )
    load = max(load_before, os.getloadavg()[0])
    rows.append(
        {"name": "machine load average (1 min, highest of start and end)", "value": load, "unit": "runnable"}
    )
    return rows
