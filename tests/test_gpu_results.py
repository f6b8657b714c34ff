"""The planner against the committed H200 measurement (benchmarks/results/2026-12-04_h200_1/).

The run: `python3 benchmarks/gpu_check.py` on one H200 (benchmarks/README.md). These tests hold the
planner's constants to what that run measured, so a change to either is seen: the MFU default is the
measured one, and the planned per-phase peaks stay within 15% of the measured ones.
"""

from __future__ import annotations

import json

import pytest

from mogan_ds.cli.launcher import REPO
from mogan_ds.plan.hardware import DEFAULT_MFU, GPUS, estimate_seconds

RESULTS = REPO / "benchmarks" / "results" / "2026-12-04_h200_1"


@pytest.fixture(scope="module")
def paper():
    c = json.loads((RESULTS / "c_paper.json").read_text())
    assert c["status"] == "ok" and c["attempts"][0]["name"] == "recipe"
    return c["attempts"][0]


def test_default_mfu_is_the_measured_one(paper):
    it = paper["comparison"]["iteration"]
    measured = it["planned_tflop"] * 1e12 / it["step_time_s"] / GPUS["h200"].bf16_dense_flops
    assert measured == pytest.approx(it["mfu_vs_datasheet"], rel=1e-3)
    assert DEFAULT_MFU == round(measured, 2)
    # the planner's time for that iteration is now the measured one
    planned_s = estimate_seconds(it["planned_tflop"] * 1e12, GPUS["h200"])
    assert planned_s == pytest.approx(it["step_time_s"], rel=0.02)


def test_planned_peaks_are_within_15_percent_of_the_measured_ones(paper):
    phases = paper["comparison"]["phases"]
    assert set(phases) == {"generator_dmd", "fake_score", "generator_gan", "discriminator"}
    for name, row in phases.items():
        assert 0.85 <= row["peak_alloc_gib"] / row["planned_peak_gib"] <= 1.15, name
    # and against the planner's current figures for that configuration, not only the run's copy
    plans = json.loads((REPO / "benchmarks" / "gpu_check_plans.json").read_text())
    plan = plans["wan2.1-t2v-1.3b"]
    states = plan["model_state_bytes"] / 2**30
    for name, row in phases.items():
        planned = states + plan["phase_act_peak_bytes"][name] / 2**30
        assert 0.85 <= row["peak_alloc_gib"] / planned <= 1.15, name
