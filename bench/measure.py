"""How the benchmark measures: timers, cache flushing, copy bandwidth and peak extra memory,
on CUDA (events, `max_memory_allocated`) and on CPU (`perf_counter`, profiler memory events).

Every contender's step is timed alone, between two timestamps, after the caches are flushed
and the gradients reset (neither timed). The contenders of one problem run interleaved, one
step each per round, so that drift of a shared machine hits them all alike; the median of the
rounds is reported, and a ratio of two contenders is the median of their per-round ratios
(paired_ratio).
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

MB = 1 << 20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def slug(name: str) -> str:
    name = re.sub(r"\((r|tm|c)\)", "", name.lower())
    name = re.sub(r"\bcpu\b|@.*$", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


class Device:
    """What differs between CPU and CUDA. `flush_bytes=0` keeps the caches warm."""

    def __init__(self, device: torch.device, flush_bytes: int):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.name = torch.cuda.get_device_name(device) if self.is_cuda else cpu_model()
        self.flush_bytes = flush_bytes
        # zeroing a buffer larger than the last-level cache evicts the inputs (what
        # triton.testing.do_bench does on GPUs); made once, so it is not in the memory peaks
        self._flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device) if flush_bytes else None

    def sync(self):
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def flush(self):
        if self._flush is not None:
            self._flush.zero_()

    def time_ms(self, step: Callable[[], None]) -> float:
        """One step's time in milliseconds."""
        if self.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    def copy_bandwidth(self, nbytes: int = 256 * MB, reps: int = 20) -> float:
        """GB/s of `dst.copy_(src)` over `nbytes` of initialized memory, counted 2 * nbytes
        (a read and a write): the practical ceiling for a memory-bound kernel here."""
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).fill_(1.0)
        dst = torch.zeros_like(src)
        for _ in range(3):
            dst.copy_(src)
        self.sync()
        times = [self.time_ms(lambda: dst.copy_(src)) for _ in range(reps)]
        del src, dst
        return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9

    def peak_extra_bytes(self, step: Callable[[], None]) -> float:
        """The most memory that one step holds at once beyond what existed before it: its
        temporaries, its outputs and the gradients it leaves in `.grad`.

        CUDA: `torch.cuda.max_memory_allocated()` minus the allocation before the step. CPU
        (torch has no CPU allocator statistics): the allocations and frees that the profiler
        records (`profile_memory=True`, every allocation through c10's CPU allocator, kernels
        of C++ extensions and Inductor's code included), replayed in time order; the peak of
        that running sum.
        """
        self.sync()
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            step()
            self.sync()
            return float(torch.cuda.max_memory_allocated(self.device) - base)
        from torch.profiler import ProfilerActivity, profile

        with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        try:
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        except AttributeError:  # a torch whose profiler internals moved
            return float("nan")
        events.sort(key=lambda e: e.start_ns())
        held = peak = 0
        for e in events:
            held += e.nbytes()
            peak = max(peak, held)
        return float(peak)


@contextlib.contextmanager
def _without_profiler_log():
    """Drop the two lines that Kineto writes to stderr at every profiler start and stop (its
    KINETO_LOG_LEVEL is only read from the environment the process started with); anything
    else written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if "ActivityProfiler" not in line:
                    sys.stderr.write(line)


def time_interleaved(dev: Device, steps: dict, *, min_reps: int, max_reps: int,
                     target_s: float, faults: dict | None = None) -> dict:
    """Per contender the list of step times (ms), and the involuntary context switches of this
    process per step (None where unknown). `steps` maps a name to `(step, reset)`; rounds
    continue until at least `min_reps` were run and the steps took `target_s` in all, or
    `max_reps` were run. Every contender gets the same number of rounds.

    `faults`, when given, receives per contender the minor page faults of this process per
    timed step: memory that the C library handed back to the kernel and takes again faults
    on first touch (each fault a trap and a zeroed 4 KiB page). Which steps pay it
    depends on the heap's layout (glibc trims its top and maps large blocks afresh), so two
    steps that move the same bytes can differ by it; the column says when they do."""
    names = list(steps)
    times = {n: [] for n in names}
    minflt = {n: 0 for n in names}
    total_ms = 0.0
    rounds = 0
    switches = _involuntary_switches()
    while rounds < max_reps and (rounds < min_reps or total_ms < target_s * 1e3):
        k = rounds % len(names)
        for n in names[k:] + names[:k]:  # rotate who goes first
            step, reset = steps[n]
            reset()
            # no sync after the flush (as triton.testing.do_bench): on a GPU the step's launches
            # queue behind it, as they queue behind the model's kernels in training
            dev.flush()
            f0 = _minor_faults()
            t = dev.time_ms(step)
            if f0 is not None:
                minflt[n] += _minor_faults() - f0
            times[n].append(t)
            total_ms += t
        rounds += 1
    after = _involuntary_switches()
    preempted = (after - switches) / (rounds * len(names)) if None not in (after, switches) else None
    if faults is not None:
        known = rounds and _minor_faults() is not None
        faults.update({n: minflt[n] / rounds if known else None for n in names})
    return times, preempted


def paired_ratio(num: list, den: list) -> float:
    """The median over rounds of num[i] / den[i], for two contenders timed in the same rounds
    of time_interleaved: each round's two steps ran back to back, so a slow phase of a shared
    machine (which moves both medians, and one more than the other when it starts or ends
    mid-run) cancels in each round's ratio."""
    if not num or len(num) != len(den):
        return float("nan")
    return statistics.median(a / b for a, b in zip(num, den))


# --steady-heap: glibc keeps freed memory (no trimming of the heap's top) and serves blocks up
# to 32 MiB (the most M_MMAP_THRESHOLD takes) from the heap instead of fresh mappings, so a
# step reuses pages already faulted in; a common setting for CPU benchmarks of PyTorch (as is
# preloading jemalloc or tcmalloc). glibc reads it at process start: bench/__main__.py
# re-executes the run with it.
STEADY_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 * MB), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def heap_setting() -> str:
    """How this process's C heap is set: 'default', or the variables of --steady-heap."""
    got = {k: os.environ[k] for k in STEADY_HEAP if k in os.environ}
    if not got:
        return "default"
    return " ".join(f"{k}={v}" for k, v in got.items())


def _minor_faults():
    """Minor page faults of this process so far (None where unknown)."""
    return _rusage("ru_minflt")


def _involuntary_switches():
    """How often the scheduler has taken a core from this process (all its threads) so far: a
    count that grows only when other processes want the CPU, so it flags a shared machine."""
    return _rusage("ru_nivcsw")


def _rusage(field: str):
    try:
        import resource
    except ImportError:  # not Unix
        return None
    return getattr(resource.getrusage(resource.RUSAGE_SELF), field)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
