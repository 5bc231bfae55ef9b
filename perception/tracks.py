"""Object tracks over time, and the events they make: who entered, what appeared, what was last
seen where, how many people were present when.

``Tracker.update`` takes one frame's detections (in stream-time order) and associates them with
the live tracks of the same class: greedily by IoU, or by centroid distance (a fraction of the
frame diagonal) for small or fast objects. Hysteresis both ways: a track is confirmed (and
announced) after ``min_hits`` detections, so one false detection makes no event; it ends only
when unseen for ``max_missed_s`` of stream time, so a missed frame or a brief occlusion keeps it.
People get count events: when the number of people in view has changed and held for
``count_stable_s``, the interval that ended ("2 people present 00:40-01:30"; the number in view
now is in perception's percepts). In a crowd (more than ``crowd`` people in view) people coming
and going make no event each: the counts tell it, and memory is not flooded with records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omnistream.perception.objects import ObjectSighting, article, relation, spoken
from omnistream.protocol.text import clock


@dataclass
class Track:
    track_id: int  # per class: "person 2", "cup 1"
    label: str
    sighting: ObjectSighting  # the latest detection
    first_ts: float
    last_ts: float
    hits: int = 1
    confirmed: bool = False
    near: str = ""  # relation to the nearest other object at the last sighting

    @property
    def name(self) -> str:
        return f"{spoken(self.label)} {self.track_id}"


@dataclass(frozen=True)
class TrackEvent:
    """Something that changed: ``kind`` "appeared" (a person: "entered"), "left" (a person) /
    "gone" (a thing), or "count" (people present). ``t0``: when it began (first seen, or the start
    of the count interval), ``ts``: when it was decided (last seen for an ending)."""

    kind: str
    label: str
    t0: float
    ts: float
    text: str
    track_id: int = 0
    count: int = 0


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _centre_distance(a: ObjectSighting, b: ObjectSighting) -> float:
    """Centre distance as a fraction of the frame diagonal."""
    width, height = a.frame_size
    dx = ((a.box[0] + a.box[2]) - (b.box[0] + b.box[2])) / 2
    dy = ((a.box[1] + a.box[3]) - (b.box[1] + b.box[3])) / 2
    return float((dx * dx + dy * dy) ** 0.5 / max((width * width + height * height) ** 0.5, 1.0))


@dataclass
class Tracker:
    min_iou: float = 0.2
    max_centre_distance: float = 0.2
    min_hits: int = 3
    max_missed_s: float = 3.0
    count_stable_s: float = 2.0
    crowd: int = 3
    tracks: list[Track] = field(default_factory=list)
    next_ids: dict[str, int] = field(default_factory=dict)
    people: int = 0  # people in view, as last announced
    people_since: float = 0.0
    _counted: tuple[int, float] | None = None  # a new number of people, since when

    def update(self, ts: float, sightings: list[ObjectSighting]) -> list[TrackEvent]:
        """Associate one frame's detections at stream time ``ts``; returns the events it makes."""
        events: list[TrackEvent] = []
        pairs = []
        for d, sighting in enumerate(sightings):
            for t, track in enumerate(self.tracks):
                if track.label != sighting.label:
                    continue
                overlap = iou(track.sighting.box, sighting.box)
                distance = _centre_distance(track.sighting, sighting)
                if overlap >= self.min_iou or distance <= self.max_centre_distance:
                    pairs.append((-overlap, distance, d, t))
        matched_d: set[int] = set()
        matched_t: set[int] = set()
        for _, _, d, t in sorted(pairs):
            if d in matched_d or t in matched_t:
                continue
            matched_d.add(d)
            matched_t.add(t)
            track = self.tracks[t]
            track.sighting, track.last_ts, track.hits = sightings[d], ts, track.hits + 1
        for d, sighting in enumerate(sightings):
            if d not in matched_d:
                track_id = self.next_ids.get(sighting.label, 0) + 1
                self.next_ids[sighting.label] = track_id
                self.tracks.append(Track(track_id, sighting.label, sighting, ts, ts))
        for track in self.tracks:
            if track.last_ts == ts:
                track.near = relation(track.sighting, sightings)
            if not track.confirmed and track.hits >= self.min_hits:
                track.confirmed = True
                events.append(self._appeared(track))
        ended = self._end(lambda track: ts - track.last_ts > self.max_missed_s)
        changes = events + ended
        return self._quiet_crowd(changes) + self._count(ts, changes)

    def flush(self, ts: float) -> list[TrackEvent]:
        """End every track (the stream stopped at ``ts``)."""
        ended = self._end(lambda track: True)
        return self._quiet_crowd(ended) + self._count(ts, ended, final=True)

    def in_view(self) -> list[Track]:
        return [track for track in self.tracks if track.confirmed]

    def people_in_view(self) -> int:
        return sum(1 for track in self.in_view() if track.label == "person")

    # -- events ------------------------------------------------------------------------------

    def _appeared(self, track: Track) -> TrackEvent:
        verb = "entered" if track.label == "person" else "appeared"
        text = f"{_described(track)} {verb} at {clock(track.first_ts)}, {_where(track)}"
        return TrackEvent("appeared", track.label, track.first_ts, track.last_ts, text, track.track_id)

    def _end(self, ended) -> list[TrackEvent]:
        events, kept = [], []
        for track in self.tracks:
            if not ended(track):
                kept.append(track)
                continue
            if track.confirmed:
                kind = "left" if track.label == "person" else "gone"
                text = (
                    f"{_described(track)} last seen at {clock(track.last_ts)}, {_where(track)} "
                    f"(in view {clock(track.first_ts)}-{clock(track.last_ts)})"
                )
                events.append(
                    TrackEvent(kind, track.label, track.first_ts, track.last_ts, text, track.track_id)
                )
        self.tracks = kept
        return events

    def _quiet_crowd(self, events: list[TrackEvent]) -> list[TrackEvent]:
        """Drop people's own enter/leave events while more than ``crowd`` people are in view."""
        people = self.people_in_view()
        left = sum(1 for event in events if event.kind == "left")
        if max(people, people + left, self.people) <= self.crowd:
            return events
        return [event for event in events if event.label != "person" or event.kind == "count"]

    def _count(self, ts: float, changes: list[TrackEvent], final: bool = False) -> list[TrackEvent]:
        """The interval of the previous number of people, once a new number has held for
        ``count_stable_s`` (or the stream ended). A change is dated when the people who came
        were first seen, or when those who left were last seen."""
        people = self.people_in_view()
        came = [e.t0 for e in changes if e.label == "person" and e.kind == "appeared"]
        left = [e.ts for e in changes if e.label == "person" and e.kind == "left"]
        if people == self.people and not final:
            self._counted = None
            return []
        if self._counted is None or self._counted[0] != people:
            since = max(came) if people > self.people and came else max(left) if left else ts
            self._counted = (people, since)
        count, since = self._counted
        if not final and ts - since < self.count_stable_s:
            return []
        events = []
        if self.people and since > self.people_since:
            text = f"{_people(self.people)} present {clock(self.people_since)}-{clock(since)}"
            events.append(TrackEvent("count", "person", self.people_since, since, text, count=self.people))
        self.people, self.people_since, self._counted = count, since, None
        return events


def _people(n: int) -> str:
    return "1 person" if n == 1 else f"{n} people"


def _described(track: Track) -> str:
    s = track.sighting
    if track.label == "person":
        return f"person {track.track_id}" + (f" (in {article(s.colour)} shirt)" if s.colour else "")
    if s.colour and s.colour.split()[0] not in track.label.split():
        return f"{s.colour} {track.name}"
    return track.name


def _where(track: Track) -> str:
    """Where it is, and what a hand does ("in the centre, near, showing an open hand"): a hand's
    record is what a question about a gesture shown minutes ago finds. (A person's pose words
    change from frame to frame; the clip descriptions carry them.)"""
    side = track.sighting.position
    where = ("in the " if side.startswith("centre") else "on the ") + side
    where += f", {track.near}" if track.near else ""
    if track.label != "person" and track.sighting.pose:
        where += ", " + ", ".join(track.sighting.pose)
    return where
