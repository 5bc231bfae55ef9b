"""Regenerate perception/data/imagenet_labels.tsv from timm's ImageNet-1k synset files.

Usage: pip download --no-deps timm; unzip the wheel; python make_imagenet_labels.py TIMM_INFO_DIR
Columns: index, synset, name (first lemma), category (head noun of the WordNet gloss, so a small
LLM reads "monarch (butterfly)" rather than a bare species name).
"""

import re
import sys
from pathlib import Path

STOP = re.compile(
    r"\b(that|which|who|with|for|of|used|consisting|having|in|on|from|to be|resembling|made|usually|"
    r"often|typically|especially|found|native|growing|where|whose|designed|worn|containing|by|at|as|"
    r"like|and|or)\b"
)


def category(gloss: str) -> str:
    clause = re.sub(r"\(.*?\)", "", gloss.split(";")[0]).strip()
    clause = re.sub(r"^(a|an|the|any|one|small|large)\s+", "", clause)
    head = STOP.split(clause, maxsplit=1)[0].strip(" ,.")
    words = head.split()
    word = words[-1] if words else ""
    # A gloss that starts with a verb or adverb ("permanently mounted", "driven by") has no head noun.
    if len(word) < 3 or word.endswith(("ly", "ed", "ing")) or word in {"set", "based", "one"}:
        return ""
    return word


def main(info: Path) -> None:
    synsets = info.joinpath("imagenet_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1) for line in info.joinpath("imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    glosses = dict(
        line.split("\t", 1)
        for line in info.joinpath("imagenet_synset_to_definition.txt").read_text().splitlines()
    )
    out = Path(__file__).resolve().parents[1] / "perception" / "data" / "imagenet_labels.tsv"
    # Glosses of dog breeds and fish name the breed or family, not the plain animal.
    by_range = {
        range(151, 269): "dog",
        range(0, 7): "fish",
        range(389, 398): "fish",
        range(321, 327): "butterfly",
    }
    rows = []
    for index, synset in enumerate(synsets):
        name = lemmas[synset].split(",")[0].strip()
        plain = next((c for r, c in by_range.items() if index in r), category(glosses.get(synset, "")))
        rows.append(f"{index}\t{synset}\t{name}\t{plain.strip('-')}")
    out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
