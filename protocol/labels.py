"""Names of the things perception detects, shared by the stages: the COCO classes of the object
detector (index = the detector's class id, 0 the background; ids 12, 26, 29, 30, 45, 66, 68, 69,
71, 83 are unused by COCO's 80 trained classes), the words people use for them, and which classes
a question names."""

from __future__ import annotations

import re

# fmt: off
COCO_LABELS = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet",
    "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# Things perception detects beyond COCO's classes: a hand with no person around it (perception/hands.py).
OTHER_LABELS = ("hand",)

UNUSED = {"street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk", "door", "blender"}

# Plain names people use for some COCO classes, and the class each everyday word points to.
SPOKEN = {"cell phone": "phone", "tv": "TV screen", "dining table": "table", "sports ball": "ball"}
SYNONYMS = {
    "phone": "cell phone", "mobile": "cell phone", "smartphone": "cell phone", "telephone": "cell phone",
    "people": "person", "man": "person", "woman": "person", "men": "person", "women": "person",
    "someone": "person", "anyone": "person", "somebody": "person", "child": "person", "kid": "person",
    "boy": "person", "girl": "person", "guy": "person", "lady": "person", "player": "person",
    "ball": "sports ball", "football": "sports ball", "soccer": "sports ball", "basketball": "sports ball",
    "table": "dining table", "desk": "dining table", "television": "tv", "screen": "tv", "monitor": "tv",
    "computer": "laptop", "notebook": "laptop", "mug": "cup", "glass": "cup", "sofa": "couch",
    "plant": "potted plant", "bike": "bicycle", "motorbike": "motorcycle", "plane": "airplane",
    "bag": "handbag", "purse": "handbag", "puppy": "dog", "kitten": "cat",
}
# fmt: on


def classes_in(text: str, labels: list[str] | None = None) -> list[str]:
    """COCO classes a question or text mentions, by name, plural or everyday word (longer names
    first: "wine glass" before "glass")."""
    names = [name for name in (labels or (*COCO_LABELS[1:], *OTHER_LABELS)) if name not in UNUSED]
    lowered = " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "
    found: list[str] = []
    for name in sorted(names, key=len, reverse=True):
        if any(f" {form} " in lowered for form in (name, name + "s", name + "es")):
            found.append(name)
    for word, name in SYNONYMS.items():
        if (f" {word} " in lowered or f" {word}s " in lowered) and name not in found:
            found.append(name)
    return found


def spoken(label: str) -> str:
    return SPOKEN.get(label, label)
