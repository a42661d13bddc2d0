"""A phase's peak memory on the CPU, split into anonymous and file-backed pages, and its peak of live tensor bytes.

Taught in notebook 09. The peak resident set (``VmHWM``, ``memory.peak_memory_bytes``)
counts every page the process maps, and transformers 5 memory-maps a
safetensors checkpoint: a model loaded from a file at its own dtype is views
into the file, and its pages join the resident set only as a forward pass reads
them. Those file-backed pages (``RssFile`` in ``/proc/self/status``) are the
page cache's, shared and dropped under pressure; the anonymous ones
(``RssAnon``: tensors the process allocated) are what a model really costs.
The kernel keeps one high-water mark for their sum only, so
:class:`MemoryPhase` samples both in a background thread every few
milliseconds and keeps the largest of each and of their sum, beside the exact
``VmHWM`` (reset when the phase begins). A sampled peak can miss a spike
shorter than the interval; ``VmHWM`` cannot, so ``resident_bytes`` never
exceeds ``hwm_bytes`` and their gap says how much a sample missed.

:class:`LiveTensorPeak` is the CPU analogue of ``torch.cuda.max_memory_allocated``:
the most bytes torch's CPU allocator held at once (tensors only: no Python
objects, no allocator slack, no memory-mapped weights), from the allocation
events ``torch.profiler`` records with ``profile_memory=True``.

Where there is no ``/proc`` (macOS, Windows) the split is not available: the
phase reports the sampled resident set (``psutil``) and the process's lifetime
peak, and says so (``split_available`` is False, the anon and file fields None).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from types import TracebackType
from typing import Any

import psutil
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from qlora_tutorial.memory import PROC_STATUS, peak_memory_bytes, reset_peak_memory

SAMPLE_SECONDS = 0.005
RESIDENT_FIELDS = ("RssAnon", "RssFile", "RssShmem")
MEMORY_EVENT = "[memory]"
MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


def read_resident(status: Path = PROC_STATUS) -> dict[str, int] | None:
    """``RssAnon``, ``RssFile`` and ``RssShmem`` of this process in bytes, or None where ``/proc`` is missing."""
    try:
        text = status.read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in RESIDENT_FIELDS:
            values[name] = int(rest.split()[0]) * 1024  # kB
    return values if len(values) == len(RESIDENT_FIELDS) else None


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later): what ``malloc`` has handed out and holds."""

    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]


def heap_reader() -> Callable[[], int] | None:
    """A function returning the bytes ``malloc`` has handed out and not taken back, or None without glibc 2.33+.

    Torch's CPU allocator takes every tensor from ``malloc``, so this counts
    live tensors plus the C and C++ libraries' own objects; not Python's small
    objects (its own arenas), memory-mapped files, or freed memory that
    ``malloc`` keeps for reuse (which ``RssAnon`` still counts). A call costs
    about a microsecond, so the sampler reads it beside ``/proc``.
    """
    try:
        mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    except (OSError, TypeError):  # no C library to open by None (Windows)
        return None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd  # chunks in use in the heaps, plus chunks given their own mapping

    return in_use


@dataclass(frozen=True)
class PhasePeak:
    """What one phase (a load, a training run) held at most, in bytes.

    ``anon_bytes`` and ``file_bytes`` are the largest sampled ``RssAnon`` and
    ``RssFile`` (not necessarily at the same instant), ``resident_bytes`` the
    largest sampled sum of all resident pages, ``hwm_bytes`` the kernel's exact
    peak of that sum since the phase began. ``heap_bytes`` is the largest
    sampled count of bytes ``malloc`` had handed out (``heap_reader``: live
    tensors and library objects, None without glibc). The ``start_`` fields
    are the values when it began, so a phase's own growth is the difference.
    """

    anon_bytes: int | None
    file_bytes: int | None
    resident_bytes: int
    hwm_bytes: int
    heap_bytes: int | None
    start_anon_bytes: int | None
    start_file_bytes: int | None
    start_resident_bytes: int
    start_heap_bytes: int | None
    seconds: float
    samples: int
    split_available: bool

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


class MemoryPhase:
    """Context manager: the peak resident memory of the code it wraps, anon and file apart (see the module doc).

    ``with MemoryPhase() as phase: load()`` then ``phase.peak``. Entering
    resets the process's high-water mark (``memory.reset_peak_memory``), so
    phases in one process measure from where each began; on Linux the reset
    works, elsewhere ``hwm_bytes`` is the process's lifetime peak.
    """

    def __init__(self, interval_s: float = SAMPLE_SECONDS, status: Path = PROC_STATUS) -> None:
        self.interval_s = interval_s
        self.status = status
        self._heap = heap_reader()
        self._peak: PhasePeak | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max: dict[str, int] = {}
        self._start: dict[str, int] = {}
        self._samples = 0
        self._started = 0.0

    def _sample(self) -> dict[str, int]:
        values = read_resident(self.status)
        sample = {} if self._heap is None else {"heap": self._heap()}
        if values is None:
            return {**sample, "resident": psutil.Process().memory_info().rss}
        return {**sample, "anon": values["RssAnon"], "file": values["RssFile"], "resident": sum(values.values())}

    def _record(self) -> None:
        sample = self._sample()
        self._samples += 1
        for name, value in sample.items():
            self._max[name] = max(self._max.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    def __enter__(self) -> MemoryPhase:
        reset_peak_memory("cpu")
        self._start = self._sample()
        self._max, self._samples, self._started = {}, 0, perf_counter()
        self._record()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memory-phase-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._record()
        split = "anon" in self._start
        self._peak = PhasePeak(
            anon_bytes=self._max.get("anon"),
            file_bytes=self._max.get("file"),
            resident_bytes=self._max["resident"],
            hwm_bytes=max(peak_memory_bytes("cpu"), self._max["resident"]),
            heap_bytes=self._max.get("heap"),
            start_anon_bytes=self._start.get("anon"),
            start_file_bytes=self._start.get("file"),
            start_resident_bytes=self._start["resident"],
            start_heap_bytes=self._start.get("heap"),
            seconds=perf_counter() - self._started,
            samples=self._samples,
            split_available=split,
        )

    @property
    def peak(self) -> PhasePeak:
        """The phase's peak; available once the ``with`` block has ended."""
        if self._peak is None:
            raise RuntimeError("The memory phase has not ended yet: read .peak after the `with` block.")
        return self._peak


class LiveTensorPeak:
    """Context manager: the most bytes of tensors alive at once in the wrapped code, from torch's CPU allocator.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and
    free of the CPU allocator while it runs; their running sum, in time order,
    peaks at ``peak_bytes``. Only blocks allocated inside the ``with`` block
    count (what was allocated before is invisible to the profiler, and so are
    tensors that are views into a memory-mapped file): wrap the whole run,
    model loading included, to get the process's tensor peak. The profiler
    keeps a record of every operator and allocation, so it costs: three steps
    of LoRA on a SmolLM2-360M shape recorded 88,000 allocations, grew the
    training peak by 0.47 GB and ran 25% slower (1.7B in bf16: 128,000
    allocations, 0.13 GB). Measure it in a run of its own, apart from the
    resident-set numbers; ``PhasePeak.heap_bytes`` is the cheap approximation.
    """

    def __init__(self) -> None:
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peak_bytes: int | None = None
        self.end_bytes: int | None = None
        self.events = 0

    def __enter__(self) -> LiveTensorPeak:
        self._profile.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._profile.__exit__(kind, error, traceback)
        # The raw events (kineto_results) keep each allocation's size and time; the aggregated
        # FunctionEvents fold them into the operator that made them, which loses the order.
        events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == MEMORY_EVENT]
        events = [e for e in events if e.device_type() == DeviceType.CPU]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        self.peak_bytes, self.end_bytes, self.events = peak, live, len(events)
