"""`omnistream eval EPISODE_DIR`: replay a recorded episode, ask its questions live, score them.

An episode directory holds ``episode.json`` (``video``, ``questions`` with ``id``, ``ask_at_s``,
``question``, ``kind``, four ``choices`` like "C a butterfly", the ``answer`` letter and
``keywords``) and the video it names. Every question is asked at its stream time through the
normal client path, once per mode (the full system and the baselines, all in the same run on the
same models), as multiple choice; the full system is also asked open-ended and scored by
keywords. Results: accuracy by mode and question kind, "past" questions apart, latency p50/p95.

Evidence recall: each answer says which stream-time spans of memory it was given from
(``AnswerDone.context``); with the question's ``evidence_s`` windows and memory's records (read
back after the replay) every answer is classed as "answered" (right), "not perceived" (no
record overlapping the evidence says it: none names a keyword or the right choice's words;
for counting and order questions any overlapping record counts), "not retrieved" (such a record
exists but its span was not in the answer's context) or "not reasoned" (it was, and the answer
is still wrong). Open answers that only restate the question are counted too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from omnistream.app.client import Client
from omnistream.app.replay import Answer, Replayer, ScheduledAsk
from omnistream.protocol.messages import MemoryRecord
from omnistream.protocol.text import content_words

MODES = ("full", "reprefill", "recent", "no_memory")
MODE_NAMES = {
    "full": "full system (streamed KV + retrieval)",
    "reprefill": "re-prefill retrieved text",
    "recent": "recent window only (30 s)",
    "no_memory": "no memory (now + last utterance)",
}
# Kinds whose evidence lies in the past (not on screen when asked). A question of another kind
# (count-people, colour, spatial, held-object, object-last-seen) is about the past when its
# evidence ended more than the recent window before it was asked.
PAST_KINDS = frozenset({"visual-past", "speech-past", "temporal-order", "counting"})
NOW_KINDS = frozenset({"visual-now", "text-in-scene"})
PAST_AFTER_S = 30.0
OPEN_ENDED = "open"
EVIDENCE_SLACK_S = 2.0  # a record this close to an evidence window counts as overlapping it
SPAN_KINDS = frozenset({"counting", "temporal-order"})  # evidence = any record in the windows
EVIDENCE_CLASSES = ("answered", "not perceived", "not retrieved", "not reasoned")
RECORD_KINDS = ["clip", "transcript", "sighting"]


class EpisodeError(ValueError):
    pass


class Question(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    ask_at_s: float
    question: str
    kind: str
    choices: list[str]
    answer: str
    keywords: list[str] = []
    evidence_s: list[float] = []

    @property
    def windows(self) -> list[tuple[float, float]]:
        """``evidence_s`` as (t0, t1) windows: [t0, t1, t0', t1', ...]."""
        flat = list(self.evidence_s)
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]

    @property
    def past(self) -> bool:
        if self.kind in PAST_KINDS or self.kind in NOW_KINDS:
            return self.kind in PAST_KINDS
        return bool(self.evidence_s) and self.ask_at_s - self.evidence_s[-1] > PAST_AFTER_S


class Episode(msgspec.Struct, forbid_unknown_fields=False):
    video: str
    questions: list[Question]
    title: str = ""
    duration_s: float = 0.0


def load_episode(directory: Path) -> tuple[Episode, Path]:
    path = Path(directory) / "episode.json"
    if not path.exists():
        raise EpisodeError(f"{directory} is not an episode: no episode.json")
    try:
        episode = msgspec.json.decode(path.read_bytes(), type=Episode)
    except msgspec.DecodeError as exc:
        raise EpisodeError(f"{path}: {exc}") from None
    video = Path(directory) / episode.video
    if not video.exists():
        raise EpisodeError(f"{path} names video {episode.video!r}, which does not exist")
    return episode, video


@dataclass
class Scored:
    question: Question
    mode: str
    answer_text: str
    choice: str
    correct: bool
    error: str
    first_token_s: float
    total_s: float
    context: list[list[float]]
    evidence: str = ""  # one of EVIDENCE_CLASSES ("" when the question has no evidence_s)
    restates: bool = False  # an open answer that only restates the question


def keyword_hit(text: str, keywords: list[str]) -> bool:
    lowered = text.lower()
    return any(keyword.lower() in lowered for keyword in keywords)


def _overlaps(a0: float, a1: float, b0: float, b1: float, slack: float = 0.0) -> bool:
    return a0 <= b1 + slack and b0 <= a1 + slack


def evidence_records(question: Question, records: list[MemoryRecord]) -> list[MemoryRecord]:
    """The records that hold the question's evidence: overlapping an evidence window and naming
    a keyword or the right choice's words (any overlapping record for counting and order)."""
    near = [
        r
        for r in records
        if any(_overlaps(r.t0, r.t1, t0, t1, EVIDENCE_SLACK_S) for t0, t1 in question.windows)
    ]
    if question.kind in SPAN_KINDS:
        return near
    right = next((c for c in question.choices if c[:1] == question.answer), "")
    right_words = set(content_words(right[1:]))
    return [
        r
        for r in near
        if keyword_hit(r.text, question.keywords)
        or (right_words and right_words <= set(content_words(r.text)))
    ]


def classify_evidence(
    question: Question, correct: bool, context: list[list[float]], records: list[MemoryRecord]
) -> str:
    """Why an answer was wrong, from where its evidence was (see the module docstring)."""
    if not question.windows:
        return ""
    if correct:
        return "answered"
    held = evidence_records(question, records)
    if not held:
        return "not perceived"
    if not any(_overlaps(r.t0, r.t1, t0, t1) for r in held for t0, t1 in context):
        return "not retrieved"
    return "not reasoned"


def restates(question: str, answer: str) -> bool:
    """An answer that echoes the question: all its words are the question's (one word of its
    own, "holding a candle", is an answer, if a wrong one), and it repeats most of them
    (picking one of the things a question lists is an answer)."""
    times = re.compile(r"\b\d+:\d\d(?::\d\d)?\b")
    if times.search(answer) and re.search(r"\b(when|what time|how long ago)\b", question, re.IGNORECASE):
        return False  # a time answers a "when"
    said = content_words(times.sub(" ", answer))  # a number is content; a time is not
    asked = set(content_words(question))
    echoed = {w for w in said if w in asked}
    return bool(said) and echoed == set(said) and len(echoed) >= 0.5 * len(asked)


def score(question: Question, mode: str, answer: Answer, records: list[MemoryRecord] | None = None) -> Scored:
    done = answer.done
    text = done.text if done else answer.text
    choice = done.choice if done else ""
    correct = keyword_hit(text, question.keywords) if mode == OPEN_ENDED else choice == question.answer
    correct = bool(correct and done and not done.error)
    context = done.context if done else []
    return Scored(
        question=question,
        mode=mode,
        answer_text=text,
        choice=choice,
        correct=correct,
        error=done.error if done else "no answer",
        first_token_s=done.first_token_s if done else float("nan"),
        total_s=done.total_s if done else float("nan"),
        context=context,
        evidence=classify_evidence(question, correct, context, records or []),
        restates=mode == OPEN_ENDED and not correct and restates(question.question, text),
    )


def _accuracy(rows: list[Scored]) -> float | None:
    return round(100.0 * sum(r.correct for r in rows) / len(rows), 1) if rows else None


def _percentile(values: list[float], q: float) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return round(float(np.percentile(finite, q)), 3) if finite else None


def summarize(rows: list[Scored]) -> dict:
    summary: dict = {}
    kinds = sorted({r.question.kind for r in rows})
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        summary[mode] = {
            "name": MODE_NAMES.get(mode, "full system, open-ended (keywords)"),
            "accuracy": _accuracy(mine),
            "past_accuracy": _accuracy([r for r in mine if r.question.past]),
            "by_kind": {kind: _accuracy([r for r in mine if r.question.kind == kind]) for kind in kinds},
            "first_token_p50_s": _percentile([r.first_token_s for r in mine], 50),
            "first_token_p95_s": _percentile([r.first_token_s for r in mine], 95),
            "total_p50_s": _percentile([r.total_s for r in mine], 50),
            "total_p95_s": _percentile([r.total_s for r in mine], 95),
            "errors": sum(bool(r.error) for r in mine),
            "n": len(mine),
            "evidence": {c: sum(r.evidence == c for r in mine) for c in EVIDENCE_CLASSES},
            "restated": sum(r.restates for r in mine),
        }
    return summary


def run_eval(
    client: Client,
    directory: Path,
    modes: tuple[str, ...] = MODES,
    open_ended: bool = True,
    speed: float = 1.0,
    progress: Callable[[float, float], None] | None = None,
) -> dict:
    episode, video = load_episode(directory)
    asks = []
    for q in episode.questions:
        asks += [
            ScheduledAsk(q.ask_at_s, q.question, list(q.choices), mode=mode, tag=f"{q.id}:{mode}")
            for mode in modes
        ]
        if open_ended:
            asks.append(ScheduledAsk(q.ask_at_s, q.question, mode="full", tag=f"{q.id}:{OPEN_ENDED}"))
    replayer = Replayer(client, speak=False)
    answers = replayer.run(video, asks, speed=speed, answer_timeout_s=900, progress=progress)
    records = client.history(kinds=RECORD_KINDS, limit=5000).items
    by_id = {q.id: q for q in episode.questions}
    rows = []
    for answer in answers:
        question_id, mode = answer.ask.tag.split(":")
        rows.append(score(by_id[question_id], mode, answer, records))
    return {
        "episode": str(directory),
        "title": episode.title,
        "speed": speed,
        "summary": summarize(rows),
        "questions": [
            {
                "id": r.question.id,
                "kind": r.question.kind,
                "mode": r.mode,
                "expected": r.question.answer,
                "choice": r.choice,
                "answer": r.answer_text,
                "correct": r.correct,
                "error": r.error,
                "first_token_s": r.first_token_s,
                "total_s": r.total_s,
                "evidence": r.evidence,
                "restates": r.restates,
                "context": r.context,
            }
            for r in rows
        ],
    }


def markdown(report: dict) -> str:
    summary = report["summary"]
    kinds = sorted({kind for s in summary.values() for kind in s["by_kind"]})
    head = [
        "mode",
        "accuracy %",
        "past %",
        *kinds,
        "first token p50/p95 s",
        "total p50/p95 s",
        "errors",
        "not perceived / retrieved / reasoned",
        "restated",
    ]
    lines = [
        f"Episode: {report['title'] or report['episode']} (replayed at {report['speed']}x)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for s in summary.values():
        cells = [
            s["name"],
            s["accuracy"],
            s["past_accuracy"],
            *(s["by_kind"].get(k) for k in kinds),
            f"{s['first_token_p50_s']} / {s['first_token_p95_s']}",
            f"{s['total_p50_s']} / {s['total_p95_s']}",
            s["errors"],
            " / ".join(str(s["evidence"][c]) for c in EVIDENCE_CLASSES[1:]),
            s["restated"],
        ]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    misses = [q for q in report["questions"] if q["mode"] in ("full", OPEN_ENDED) and not q["correct"]]
    if misses:
        lines += ["", "Wrong answers of the full system:", "", "| question | kind | mode | why | answer |"]
        lines.append("|---|---|---|---|---|")
        for q in misses:
            answer = " ".join(q["answer"].split())[:100].replace("|", "/")
            why = q["evidence"] + (" (restates the question)" if q["restates"] else "")
            lines.append(f"| {q['id']} | {q['kind']} | {q['mode']} | {why} | {answer} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(markdown(report))
    return json_path, md_path
