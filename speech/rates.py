"""Sample rates the speech stage can convert cheaply.

Converting between two rates is a polyphase filter of about ``20 * max(up, down)`` taps, where
``up / down`` is the reduced ratio: 44.1 kHz to 16 kHz is 160 / 441 (8820 taps), but a prime rate
such as 44 101 Hz is 16 000 / 44 101, a filter of 882 020 taps rebuilt for every chunk (seconds of
CPU per 20 ms of sound). Rates whose ratio to the rates used inside (16 kHz heard, 24 kHz
spoken) needs more than ``MAX_RESAMPLE_TERMS`` are refused; every usual rate (8, 11.025, 16,
22.05, 24, 32, 44.1, 48, 88.2, 96, 176.4, 192 kHz) needs at most 441.

Light on purpose (no scipy): the gateway checks requests with it.
"""

from __future__ import annotations

from fractions import Fraction

MAX_RESAMPLE_TERMS = 1000
INNER_RATES = (16000, 24000)  # what speech listens at, what its voice speaks at


def resample_terms(from_rate: int, to_rate: int) -> int:
    """The larger term of the reduced ratio ``to_rate / from_rate`` (the filter grows with it)."""
    ratio = Fraction(to_rate, from_rate)
    return max(ratio.numerator, ratio.denominator)


def sample_rate_problem(rate: int) -> str | None:
    """Why audio at ``rate`` Hz is refused (its conversion would cost too much), None when fine."""
    worst = max(resample_terms(rate, inner) for inner in INNER_RATES)
    if worst > MAX_RESAMPLE_TERMS:
        return (
            f"sample_rate {rate} Hz would need a {20 * worst}-tap resampling filter: send one of the "
            "usual rates (8000, 16000, 22050, 24000, 32000, 44100, 48000, 96000 Hz)"
        )
    return None
