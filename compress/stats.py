"""Bootstrap intervals over eval examples: the record's intervals (`compress.records.relate`) and the
gate's paired test (`compress.gate`) resample the same way.

Every interval draws `RESAMPLES` resamples of the example indices, with replacement, from a fixed seed
(the same indices for every call with the same number of examples: reproducible, and paired when two
score vectors of the same examples are resampled together), and takes the percentile interval.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

RESAMPLES = 2000
"""Bootstrap resamples per interval: the bounds move by about 0.002 between seeds at 500 examples."""
SEED = 0
CONFIDENCE = 0.95


@lru_cache(maxsize=8)
def resamples(n: int, count: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(count, n) example indices drawn with replacement (read-only; cached per n)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(count, n))
    idx.flags.writeable = False
    return idx


def _interval(values: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return [float(low), float(high)]


def _means(scores, idx: np.ndarray) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64)[idx].mean(axis=1)  # (count,)


def mean_ci(scores: list[float] | None, confidence: float = CONFIDENCE) -> list[float] | None:
    """[low, high]: the interval of the mean score over examples; None without scores."""
    if not scores:
        return None
    return _interval(_means(scores, resamples(len(scores))), confidence)


def ratio_ci(num: list[float] | None, den: list[float] | None,
             confidence: float = CONFIDENCE) -> list[float] | None:
    """[low, high]: the paired interval of mean(num) / mean(den), both taken on the same resampled examples;
    None without scores, with different counts, or when some resample's mean(den) is 0."""
    if not num or not den or len(num) != len(den):
        return None
    idx = resamples(len(num))
    top, bottom = _means(num, idx), _means(den, idx)
    if not (bottom > 0).all():
        return None
    return _interval(top / bottom, confidence)


def drop_ci(base: list[float], new: list[float], confidence: float = CONFIDENCE) -> tuple[float, list[float]]:
    """(drop, [low, high]): mean(base) - mean(new) over the same examples, and its paired interval.
    The drop is significant at `confidence` when low > 0 (the whole interval above zero)."""
    base_arr, new_arr = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    diff = base_arr - new_arr  # per example: paired
    return float(diff.mean()), _interval(_means(diff, resamples(len(diff))), confidence)
