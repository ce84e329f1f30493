"""Summary statistics and timing of repeated measurements."""

import time

import numpy as np


def summarize(values):
    """Return ``{"median", "min", "max", "p90", "runs"}`` of a non-empty list of numbers.

    ``p90`` is NumPy's linearly interpolated 90th percentile.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value; received an empty list.")
    array = np.asarray(values)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"summarize needs finite values; received {values}.")
    return {
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
        "p90": float(np.percentile(array, 90)),
        "runs": len(values),
    }


def time_calls(fn, runs, warmup=1):
    """Call ``fn()`` ``warmup`` times untimed, then ``runs`` times; summarize in milliseconds."""
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be a positive integer; received {runs!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer; received {warmup!r}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return summarize(times)


def ratio(numerator, denominator):
    """Return ``numerator / denominator`` of two figures' medians (or plain numbers)."""
    top = numerator["median"] if isinstance(numerator, dict) else numerator
    bottom = denominator["median"] if isinstance(denominator, dict) else denominator
    if top is None or bottom in (None, 0):
        return None
    return float(top) / float(bottom)
