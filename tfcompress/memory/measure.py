"""Measured peak memory of running a function.

On a GPU: ``tf.config.experimental.reset_memory_stats("GPU:0")`` before and the
``peak`` of ``get_memory_info("GPU:0")`` after, the TensorFlow allocator's own count.

On CPU (Linux): the process's peak resident set size. Writing "5" to
``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM`` to the current
``VmRSS`` (Linux 4.0 and later), so the peak of ``fn`` is ``VmHWM`` after it minus
``VmRSS`` before it. Limits: it counts everything the process maps (Python objects,
graph tracing, TensorFlow's thread pools), memory freed earlier and kept by the
allocator is reused without raising the peak, and other threads of the process count
too. Warm up ``fn`` once (tracing, kernel caches) before measuring it.
"""

import dataclasses

from tfcompress._keras import tf


@dataclasses.dataclass
class MemoryMeasurement:
    """Peak bytes above the starting point while ``fn`` ran, and how it was measured."""

    peak_bytes: int
    method: str
    result: object = None


def _status_bytes(field):
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is missing from /proc/self/status.")


def measure(fn, device=None):
    """Run ``fn()`` and return its peak memory as a ``MemoryMeasurement``.

    Args:
      fn: a function without arguments; its return value is kept in ``result``.
      device: "GPU:0" style name to read TensorFlow's allocator, or "cpu" for the
        process RSS; by default the first GPU when there is one, else "cpu".

    Raises:
      NotImplementedError: on CPU where ``/proc/self/clear_refs`` is not writable
        (not Linux, or a kernel older than 4.0).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; received {type(fn).__name__}.")
    if device is None:
        device = "GPU:0" if tf.config.list_physical_devices("GPU") else "cpu"

    if device != "cpu":
        tf.config.experimental.reset_memory_stats(device)
        start = tf.config.experimental.get_memory_info(device)["current"]
        result = fn()
        peak = tf.config.experimental.get_memory_info(device)["peak"]
        return MemoryMeasurement(peak - start, f"tf allocator peak on {device}", result)

    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        raise NotImplementedError(
            f"measuring CPU memory needs a writable /proc/self/clear_refs (Linux 4.0+): "
            f"{error}. Run on a GPU or measure in a fresh process with "
            "resource.getrusage.") from None
    start = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM")
    return MemoryMeasurement(peak - start, "process peak RSS (VmHWM after clear_refs)", result)
