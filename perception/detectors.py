"""Optional detectors: objects on sampled frames; faces with session-stable person ids and text in
scene on keyframes; motion.

Objects (``perception.objects``: COCO classes with positions and colours) run on frames sampled
at ``objects_fps``, keyframes included (~0.1 s a frame on one core). On those of them where a
person was found, the pose estimator (``perception.pose``: MoveNet keypoints, ~10 ms a person)
adds pose words to the people's detections: standing or sitting, an arm raised, what they hold.

Faces: dlib's HOG detector, 5-point landmarks and ResNet descriptors (128-d, from the
``face-recognition-models`` package); a ``PersonRegistry`` matches each descriptor to the
running mean of the people seen so far, so the same face gets the same id all session. Text:
RapidOCR (PP-OCRv4 det + rec, ONNX). Both are slow (~0.1-1 s per frame on one core), so the
stage runs them on keyframes in a ``DetectorWorker`` thread, off the encoding path; dlib and
onnxruntime release the GIL while they compute. Motion is cheap and runs on every frame.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from omnistream.perception import hands as hand_words
from omnistream.perception.hands import HandReader
from omnistream.perception.objects import (
    ObjectDetector,
    ObjectSighting,
    middle_colours,
    package_dir,
    picture_area,
)
from omnistream.perception.pose import PoseEstimator

log = logging.getLogger("omnistream.perception")

# dlib's descriptors put the same person within ~0.6 (Euclidean); 0.55 errs towards new ids.
FACE_MATCH_DISTANCE = 0.55
# A person unseen for this long "comes back" when seen again.
COMEBACK_GAP_S = 30.0


@dataclass
class Person:
    person_id: int
    descriptor_sum: np.ndarray  # float64 (128,)
    count: int
    first_seen: float  # stream seconds
    last_seen: float

    @property
    def mean(self) -> np.ndarray:
        return self.descriptor_sum / self.count


@dataclass(frozen=True)
class FaceSighting:
    person_id: int
    box: tuple[int, int, int, int]  # left, top, right, bottom (pixels)
    new: bool  # first time this person is seen
    back_after_s: float  # > 0: unseen for this long before (a comeback)

    def label(self) -> str:
        return f"person {self.person_id}"


class PersonRegistry:
    """Session-stable ids for face descriptors (nearest running mean within ``match_distance``)."""

    def __init__(self, match_distance: float = FACE_MATCH_DISTANCE, comeback_gap_s: float = COMEBACK_GAP_S):
        self.match_distance = match_distance
        self.comeback_gap_s = comeback_gap_s
        self.people: list[Person] = []

    def identify(self, descriptors: list[np.ndarray], ts: float) -> list[tuple[int, bool, float]]:
        """(person id, new, back_after_s) per descriptor (128,). Faces of one frame get distinct ids."""
        taken: set[int] = set()
        results = []
        for descriptor in descriptors:
            candidates = [
                (float(np.linalg.norm(descriptor - person.mean)), person)
                for person in self.people
                if person.person_id not in taken
            ]
            distance, match = min(candidates, key=lambda c: c[0], default=(np.inf, None))
            if match is None or distance > self.match_distance:
                match = Person(len(self.people) + 1, descriptor.astype(np.float64), 1, ts, ts)
                self.people.append(match)
                results.append((match.person_id, True, 0.0))
            else:
                gap = ts - match.last_seen
                match.descriptor_sum += descriptor
                match.count += 1
                match.last_seen = max(match.last_seen, ts)
                results.append((match.person_id, False, gap if gap >= self.comeback_gap_s else 0.0))
            taken.add(match.person_id)
        return results


class FaceDetector:
    """dlib HOG face detector + ResNet descriptors. ``detect`` takes uint8 (H, W, 3) RGB."""

    def __init__(self, registry: PersonRegistry | None = None, upsample: int = 1):
        import dlib

        models = (
            package_dir("face_recognition_models", "face-recognition-models", "face detection") / "models"
        )
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._describer = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )
        self.registry = registry or PersonRegistry()
        self.upsample = upsample

    def descriptors(self, image: np.ndarray) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
        """Boxes (left, top, right, bottom) and 128-d descriptors, largest face first."""
        image = np.ascontiguousarray(image)
        boxes = sorted(self._detector(image, self.upsample), key=lambda b: -b.area())
        return [
            (
                (b.left(), b.top(), b.right(), b.bottom()),
                np.asarray(self._describer.compute_face_descriptor(image, self._landmarks(image, b))),
            )
            for b in boxes
        ]

    def detect(self, image: np.ndarray, ts: float) -> list[FaceSighting]:
        found = self.descriptors(image)
        ids = self.registry.identify([d for _, d in found], ts)
        return [
            FaceSighting(pid, box, new, back) for (box, _), (pid, new, back) in zip(found, ids, strict=True)
        ]


class TextReader:
    """RapidOCR restricted to the ``max_boxes`` largest text boxes (the prominent text).

    Detection runs at ``max_side`` pixels on the longer side: a smaller frame is upscaled to it
    (small print in a 640x360 frame, a label on a box, is found at 800 px and missed at 640:
    docs/episodes/mixed at 00:49), a larger one is reduced (RapidOCR's default upscales every
    frame to 736 px on the *shorter* side, ~5x slower); one thread each, cls off.
    """

    def __init__(self, max_boxes: int = 6, min_score: float = 0.6, max_side: int = 800):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                "text reading needs rapidocr-onnxruntime (pip install --no-deps rapidocr-onnxruntime)"
            ) from exc
        self._ocr = RapidOCR(
            use_cls=False,
            intra_op_num_threads=1,
            inter_op_num_threads=1,
            det_limit_side_len=max_side,
            det_limit_type="max",
        )
        self.max_boxes = max_boxes
        self.min_score = min_score
        self.max_side = max_side

    def read(self, image: np.ndarray) -> list[str]:
        """uint8 (H, W, 3) RGB -> the text lines read, largest first."""
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # PP-OCR models were trained on BGR
        scale = self.max_side / max(bgr.shape[:2])
        if scale > 1.0:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        prepared, _, _ = self._ocr.preprocess(bgr)
        boxes, _ = self._ocr.auto_text_det(prepared)
        if boxes is None:
            return []
        boxes = sorted(boxes, key=lambda box: -cv2.contourArea(np.asarray(box, np.float32)))[: self.max_boxes]
        crops = self._ocr.get_crop_img_list(prepared, boxes)
        recognised, _ = self._ocr.text_rec(crops, False)
        # Lone characters are mostly noise (grid digits, stray marks), not text a viewer would quote.
        return [
            text.strip()
            for text, score, *_ in recognised
            if score >= self.min_score and len(text.strip()) >= 2
        ]


def motion_thumbnail(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (24, 32) grey thumbnail in [0, 1] for ``motion_between``."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (32, 24), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def motion_between(previous: np.ndarray | None, current: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails, in [0, 1] (0: still)."""
    return 0.0 if previous is None else float(np.abs(current - previous).mean())


@dataclass
class Detections:
    """What the detectors found on one frame at stream time ``ts``. ``objects`` is None when the
    object detector did not run on it; faces and text are only looked for on keyframes."""

    ts: float
    session: str
    keyframe: bool = True
    faces: list[FaceSighting] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    objects: list[ObjectSighting] | None = None
    colours: str = ""  # the middle of the picture's colour (objects.middle_colours), with the objects
    seconds: float = 0.0  # compute time
    tag: object = None  # what the submitter passed along


class DetectorWorker:
    """Runs the enabled detectors in a background thread, newest frame first: objects on every
    frame submitted (and poses of the people among them), faces and text on keyframes.

    ``submit`` never blocks: a frame offered while one is waiting replaces it (``submit``
    returns the replaced frame's tag); the newer frame inherits the replaced one's keyframe duty.
    Results, tagged with what the caller passed, are collected with ``results()`` from the
    stage's thread.
    """

    def __init__(
        self,
        faces: FaceDetector | None,
        reader: TextReader | None,
        objects: ObjectDetector | None = None,
        pose: PoseEstimator | None = None,
        hands: HandReader | None = None,
    ):
        self.faces = faces
        self.reader = reader
        self.objects = objects
        self.pose = pose  # runs only on frames where the object detector found a person
        self.hands = hands  # on every object frame: hands in close-ups have no person around them
        self._cond = threading.Condition()
        self._waiting: tuple[np.ndarray, float, str, object, bool] | None = None
        self._busy = False
        self._done: list[Detections] = []
        self._stop = False
        self.failures = 0
        self.replaced = 0
        self._thread = threading.Thread(target=self._run, name="detectors", daemon=True)
        self._thread.start()

    def submit(
        self, image: np.ndarray, ts: float, session: str, tag: object = None, keyframe: bool = True
    ) -> object:
        """Queue a frame (uint8 (H, W, 3) RGB, not mutated afterwards by the caller)."""
        with self._cond:
            replaced = None
            if self._waiting is not None:
                self.replaced += 1
                replaced = self._waiting[3]
                keyframe = keyframe or (self._waiting[4] and self._waiting[2] == session)
            self._waiting = (image, ts, session, tag, keyframe)
            self._cond.notify_all()
            return replaced

    def results(self) -> list[Detections]:
        with self._cond:
            done, self._done = self._done, []
            return done

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._waiting is not None)
                if self._stop:
                    return
                assert self._waiting is not None
                image, ts, session, tag, keyframe = self._waiting
                self._waiting, self._busy = None, True
            start = time.monotonic()
            found = Detections(ts=ts, session=session, tag=tag, keyframe=keyframe)
            try:
                if self.objects is not None:
                    found.objects = self.objects.detect(image)
                    found.colours = middle_colours(image)
                    if self.hands is not None or (
                        self.pose is not None and any(s.label == "person" for s in found.objects)
                    ):
                        found.objects = self._annotate(image, found.objects)
                if keyframe and self.faces is not None:
                    found.faces = self.faces.detect(image, ts)
                if keyframe and self.reader is not None:
                    found.text = self.reader.read(image)
            except Exception:  # a detector failure loses one keyframe, never the stage
                log.exception("detector failed", extra={"stage": "perception"})
                self.failures += 1
            found.seconds = time.monotonic() - start
            with self._cond:
                self._done.append(found)
                self._busy = False
                self._cond.notify_all()

    def _annotate(self, image: np.ndarray, objects: list[ObjectSighting]) -> list[ObjectSighting]:
        """The people's pose words and the hands' gestures and holds; a failure of either keeps
        the frame's detections as they were."""
        try:
            poses = {}
            if self.pose is not None and any(s.label == "person" for s in objects):
                poses = self.pose.estimate(image, objects)
            found = self.hands.find(image, list(poses.values())) if self.hands is not None else []
            size = (image.shape[1], image.shape[0])
            return hand_words.annotate(objects, poses, found, size, picture_area(image))
        except Exception:
            log.exception("pose or hand estimation failed", extra={"stage": "perception"})
            self.failures += 1
            return objects

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting is None and not self._busy, timeout_s)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
