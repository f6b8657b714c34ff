"""One iteration under torch.profiler (`logging.profile_step`): where its time goes, per phase and per operator.

Rank 0 profiles the iteration whose metrics row is `logging.profile_step` and writes, beside the
rank logs, ``profile_step_<N>.txt`` (torch's operator table: the top `logging.profile_rows` by
self time on the accelerator, on the CPU without one) and ``profile_step_<N>.json`` for scripts:

    phases_ms      each phase's wall time inside the profiled iteration (its ``phase:<name>`` range,
                   which ends after the accelerator synchronised), ms
    top            the operators/kernels with the most self time in the iteration, with calls and share
    phase_top      per phase, the kernels (CPU operators without an accelerator) that ran inside its range

Kernels are assigned to a phase by time: `MoGANStep._timed` synchronises the accelerator before
a phase's range closes, so every kernel a phase launched has run inside that range. A Chrome trace
(``profile_step_<N>.trace.json``, large: hundreds of MB for one paper-size iteration) only with
`logging.profile_trace`. The other ranks run unprofiled: their collectives wait on rank 0, so the
profiled row's times are slower than the rows around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

log = logging.getLogger(__name__)

PHASE_PREFIX = "phase:"


def phase_range(name: str):
    """The profiler range of one phase (a no-op unless a profiler is running)."""
    return record_function(PHASE_PREFIX + name)


@contextlib.contextmanager
def profiled_iteration(out_dir: Path, step: int, device: torch.device, rows: int, trace: bool):
    """Profile what runs inside; on exit write the files of the module docstring under `out_dir`."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        yield
    stem = Path(out_dir) / f"profile_step_{step}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(prof, rows, on_device) | {"step": step, "device": str(device)}
    sort = "self_device_time_total" if on_device else "self_cpu_time_total"
    stem.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=rows) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    if trace:
        prof.export_chrome_trace(str(stem.with_suffix(".trace.json")))
    log.info("profiled step %d: %s.{txt,json}", step, stem)


def summarize(prof, rows: int, on_device: bool) -> dict:
    """The JSON summary: phase wall times, the top operators, and each phase's top kernels/operators."""

    def is_work(e) -> bool:
        if on_device:
            return e.device_type == DeviceType.CUDA and not e.is_user_annotation
        return e.device_type == DeviceType.CPU and not e.name.startswith(PHASE_PREFIX)

    def self_us(e) -> float:
        return e.time_range.elapsed_us() if on_device else e.self_cpu_time_total

    events = prof.events()
    markers = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith(PHASE_PREFIX)]
    work = [e for e in events if is_work(e)]
    total_us = sum(self_us(e) for e in work) or 1.0

    def top(items) -> list[dict]:
        us, calls = defaultdict(float), defaultdict(int)
        for e in items:
            us[e.name] += self_us(e)
            calls[e.name] += 1
        ranked = sorted(us, key=us.get, reverse=True)[:rows]
        return [
            {"name": n, "self_ms": round(us[n] / 1e3, 3), "calls": calls[n], "share": round(us[n] / total_us, 4)}
            for n in ranked
        ]

    ranges = defaultdict(list)  # phase -> its (start, end) ranges: the fake score runs once per critic update
    for m in markers:
        ranges[m.name[len(PHASE_PREFIX) :]].append((m.time_range.start, m.time_range.end))
    phase_top = {}
    for name, spans in ranges.items():
        inside = [e for e in work if any(a <= e.time_range.start < b for a, b in spans)]
        phase_top[name] = {"work_ms": round(sum(self_us(e) for e in inside) / 1e3, 3), "top": top(inside)[:10]}
    return {
        "kind": "device kernels" if on_device else "CPU operators (self time)",
        "work_ms_total": round(total_us / 1e3, 3),
        "phases_ms": {k: round(sum(b - a for a, b in spans) / 1e3, 3) for k, spans in ranges.items()},
        "top": top(work),
        "phase_top": phase_top,
    }
