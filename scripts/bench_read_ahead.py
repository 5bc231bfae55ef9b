"""First token and first four words of an answer, with and without the question read ahead.

    python scripts/bench_read_ahead.py qwen2.5-coder-0.5b

Asks the five LibriVox sentences (as `omnistream bench speech` speaks them) twice each way: as a
typed question ("plain": memory assembled and the whole suffix prefilled after the Ask), and read
ahead ("draft": two drafts, the first half of the words and all but the last two, then the Ask),
and prints the time to the first piece and to the first phrase of four words, with the answer
(which must be the same both ways).
"""

from __future__ import annotations

import os
import sys
import time


def main(model: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from omnistream.bench.speech import librivox
    from omnistream.protocol.config import load_config
    from omnistream.protocol.messages import Ask, Draft
    from omnistream.reasoning.answer import Answerer
    from omnistream.reasoning.llm.engine import LLMEngine
    from omnistream.reasoning.llm.prepare import prepare_llm
    from omnistream.speech.speak import PhraseSplitter

    config = load_config()
    answerer = Answerer(LLMEngine(prepare_llm(model, config.cache_dir), "auto", config.reasoning.threads))
    for mode in ("plain", "draft", "plain", "draft"):
        for i, (_, text) in enumerate(librivox()):
            ask = Ask(turn=f"t{i}", question=text, session="bench")
            prepared = None
            if mode == "draft":
                spoken = text.split()
                answerer.prepare(Draft(session="bench", question=" ".join(spoken[: len(spoken) // 2])), [])
                answerer.prepare(Draft(session="bench", question=" ".join(spoken[:-2])), None)
                prepared = answerer.take_prepared(ask)
            start, first, phrase, answer = time.perf_counter(), None, None, ""
            splitter = PhraseSplitter(first_words=4)
            for piece, _ in answerer.answer(ask, [], 32, lambda: False, prepared):
                now = time.perf_counter() - start
                answer += piece
                first = now if first is None else first
                if phrase is None and splitter.push(piece):
                    phrase = now
            phrase_ms = f"{phrase * 1000:.0f}" if phrase is not None else "-"
            print(
                f"{mode} q{i}: first piece {first * 1000:.0f} ms, first phrase {phrase_ms} ms | {answer[:70]!r}"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b")
