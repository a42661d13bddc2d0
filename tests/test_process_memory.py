"""The peak of a phase split into anonymous and file-backed pages, the heap reader, and the live-tensor peak."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_tutorial.process_memory import LiveTensorPeak, MemoryPhase, heap_reader, read_resident

BLOCK = 64 * 2**20  # 64 MiB: far above the noise of an idle interpreter
linux_only = pytest.mark.skipif(read_resident() is None, reason="the anon/file split needs Linux's /proc")


@linux_only
def test_a_touched_array_grows_the_anonymous_pages_not_the_file_backed_ones():
    # A new private anonymous mapping, each page written: malloc cannot hand back pages an earlier test freed but kept.
    block = mmap.mmap(-1, BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with MemoryPhase() as phase:
        for offset in range(0, BLOCK, mmap.PAGESIZE):
            block[offset] = 1
    peak = phase.peak
    assert peak.split_available
    assert peak.anon_bytes - peak.start_anon_bytes >= 0.9 * BLOCK
    assert peak.file_bytes - peak.start_file_bytes < 0.25 * BLOCK
    assert peak.hwm_bytes >= peak.resident_bytes >= peak.anon_bytes
    block.close()


@linux_only
def test_reading_a_memory_mapped_file_grows_the_file_backed_pages_not_the_anonymous_ones(tmp_path: Path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, BLOCK, dtype=np.uint8).tobytes())
    with MemoryPhase() as phase:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        total = int(mapped.sum(dtype=np.uint64))  # reads every page through the mapping
    peak = phase.peak
    assert total > 0
    assert peak.file_bytes - peak.start_file_bytes >= 0.9 * BLOCK
    assert peak.anon_bytes - peak.start_anon_bytes < 0.25 * BLOCK
    del mapped


def test_without_proc_the_phase_reports_the_resident_set_and_says_the_split_is_missing(tmp_path: Path):
    with MemoryPhase(status=tmp_path / "no-proc-status") as phase:
        block = np.ones(BLOCK // 8)
    peak = phase.peak
    assert not peak.split_available
    assert peak.anon_bytes is None and peak.file_bytes is None and peak.start_anon_bytes is None
    assert peak.resident_bytes >= BLOCK
    assert set(peak.as_dict()) >= {"anon_bytes", "file_bytes", "resident_bytes", "hwm_bytes", "heap_bytes"}
    del block


def test_the_peak_is_read_after_the_phase_ends():
    phase = MemoryPhase()
    with pytest.raises(RuntimeError, match="after the `with` block"):
        _ = phase.peak


@pytest.mark.skipif(heap_reader() is None, reason="mallinfo2 needs glibc 2.33 or later")
def test_the_heap_counts_a_tensor_while_it_lives():
    read = heap_reader()
    before = read()
    tensor = torch.ones(BLOCK // 4)
    during = read()
    del tensor
    assert during - before >= 0.9 * BLOCK
    assert read() < during


def test_the_live_tensor_peak_sees_a_freed_tensor_and_the_end_does_not():
    with LiveTensorPeak() as live:
        big = torch.ones(BLOCK // 4)
        del big
        small = torch.ones(1024)
    assert live.events >= 3  # two allocations and a free
    assert live.peak_bytes >= BLOCK
    assert live.end_bytes < BLOCK / 8
    assert small.sum() == 1024


def test_the_live_tensor_peak_misses_tensors_made_before_it_started():
    before = torch.ones(BLOCK // 4)
    with LiveTensorPeak() as live:
        after = before + 1
    assert BLOCK <= live.peak_bytes < 1.5 * BLOCK  # the sum, not its input
    del after
