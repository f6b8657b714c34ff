"""benchmarks/gpu_check.py (its parts in benchmarks/gpu/), the one prepared command for a GPU machine, kept
alive between GPU runs.

The slow test runs it with --cpu-smoke: every part (a env, d DiT, b the launcher with a resume, c the
paper's iteration against the planner) at tiny shapes on the CPU, through the same code, and checks
each part's JSON has status ok and the fields the GPU run fills. The others check its pieces.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_part(name: str):
    """A module of benchmarks/gpu/, imported as the script imports it (loading the script puts it on sys.path)."""
    load_script()
    return importlib.import_module(f"gpu.{name}")


def test_torch_adamw_switch_replaces_fused_adam_on_cuda(monkeypatch):
    """optim.fused_adam=false: the fallback part b takes when DeepSpeed cannot JIT-compile FusedAdam."""
    from mogan_ds.config import load_config
    from mogan_ds.plan.comm import PlanTopology
    from mogan_ds.train import roles

    base = roles.load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    monkeypatch.setattr(roles, "_on_cpu", lambda: False)  # as on a GPU machine
    topo = PlanTopology(1, 1)
    fused = load_config("tiny", [])
    assert "torch_adam" not in roles.ds_config_for("generator", fused, base, topo)["optimizer"]["params"]
    torch_adamw = load_config("tiny", ["optim.fused_adam=false"])
    assert roles.ds_config_for("generator", torch_adamw, base, topo)["optimizer"]["params"]["torch_adam"] is True


def test_random_prompt_folder_is_read_by_the_training_stream(tmp_path):
    from mogan_ds.data.prompts import PromptEmbeddings, load_special_embeddings

    inputs = load_part("paper_inputs")
    meta = inputs.write_random_prompts(tmp_path, num=5, max_length=16, dim=8, negative_prompt="neg", disc_prompt="disc")
    assert meta["num_prompts"] == 5
    special = load_special_embeddings(str(tmp_path), "neg")
    assert special["negative"].shape == special["disc"].shape == (1, 16, 8)
    batch = next(iter(PromptEmbeddings(str(tmp_path), 0, 1, 0, 2)))
    assert batch["embeds"].shape == (2, 16, 8)
    lengths = batch["embeds"].abs().sum(-1).gt(0).sum(-1)
    assert ((lengths >= 2) & (lengths <= 8)).all()  # true lengths in [max_length/8, max_length/2], zeros after


def test_comparison_per_phase_and_iteration():
    paper = load_part("paper")
    gib = 2**30
    plan = {
        "phase_flops": {"generator_dmd": 2e12, "fake_score": 4e12},
        "phase_act_peak_bytes": {"generator_dmd": 1 * gib, "fake_score": 3 * gib},
        "model_state_bytes": 10 * gib,
        "iteration_flops": 6e12,
        "est_iteration_s": 2.0,
        "mfu_assumed": 0.35,
        "bf16_dense_flops": 989e12,
        "peak_bytes": 13 * gib,
        "fits": True,
    }
    warmup = {"step": 1, "time_generator_dmd": 9.0, "time_fake_score": 9.0, "step_time": 18.0}
    rows = [
        warmup,
        {
            "step": 2,
            "time_generator_dmd": 1.0,
            "time_fake_score": 2.0,
            "step_time": 3.0,
            "peak_mem_gib_fake_score": 6.5,
        },
        {
            "step": 3,
            "time_generator_dmd": 3.0,
            "time_fake_score": 2.0,
            "step_time": 5.0,
            "peak_mem_gib_fake_score": 7.8,
        },
    ]
    out = paper.compare(rows, plan, ceiling_tflops=4.0)
    assert out["timed_steps"] == [2, 3]
    dmd, fake = out["phases"]["generator_dmd"], out["phases"]["fake_score"]
    assert dmd["time_s"] == 2.0 and dmd["achieved_tflops"] == 1.0
    assert dmd["peak_alloc_gib"] == "n/a" and dmd["measured_over_planned_peak"] == "n/a"  # no per-phase key
    assert fake["peak_alloc_gib"] == 7.8 and fake["planned_peak_gib"] == 13.0
    assert fake["measured_over_planned_peak"] == pytest.approx(0.6)
    it = out["iteration"]
    assert it["step_time_s"] == 4.0 and it["achieved_tflops"] == 1.5 and it["peak_alloc_gib"] == 7.8
    assert it["mfu_vs_measured_ceiling"] == pytest.approx(0.375) and it["measured_over_planned_s"] == 2.0
    assert paper.compare(rows[:1], plan, None) == {"note": "no timed iteration yet (the first is the warm-up)"}


def test_out_of_memory_is_attributed_to_its_phase():
    run = load_part("launcher_run")
    tb = (
        'Traceback (most recent call last):\n  File "/r/mogan_ds/trainer.py", line 300, in fit\n'
        '  File "/r/mogan_ds/trainer.py", line 180, in train_step\n'
        '  File "/r/mogan_ds/trainer.py", line 340, in _timed\n'
        '  File "/r/mogan_ds/trainer.py", line 230, in generator_gan_update\n'
        '  File "/r/mogan_ds/motion/pipeline.py", line 90, in fake\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity\n"
    )
    assert run.oom_phase(tb) == "generator_gan"
    assert run.oom_message(tb).startswith("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert run.oom_phase('  File "/r/mogan_ds/engines.py", line 9, in build_engine\nCUDA out of memory.\n') == "setup"
    assert run.oom_phase("RuntimeError: something else\n") is None


def test_shipped_plans_cover_every_configuration_the_check_runs():
    """benchmarks/gpu_check_plans.json (python benchmarks/gpu_check.py --write-plans) has each spec,
    with the per-phase figures c compares against; stale ones are recomputed on the GPU machine."""
    specs = load_part("plans")
    plans = json.loads(specs.PLANS_FILE.read_text())
    assert set(plans) == set(specs.PLAN_SPECS)
    for name, plan in plans.items():
        assert plan["overrides"] == specs.PLAN_SPECS[name]["overrides"]
        assert set(plan["phase_flops"]) == set(plan["phase_act_peak_bytes"]) >= {"generator_dmd", "fake_score"}
        assert plan["model_state_bytes"] > 0 and plan["iteration_flops"] == sum(plan["phase_flops"].values())
    paper = plans["wan2.1-t2v-1.3b"]["summary"]
    assert paper["fits"] and paper["activation_peak_phase"] == "generator_gan"


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tiny_workdir, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work", str(work)]
    cmd += [f"--tiny={o}" for o in tiny_workdir]  # b reuses the session's tiny models, shards and prompts
    cmd += ["--c-profile=3"]  # c's last row runs under torch.profiler (logging.profile_step)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}\n{log[-6000:]}"

    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [x["check"] for x in lines] == ["a_env", "d_dit", "b_launcher", "c_paper", "summary"]
    assert (out / "gpu_check.jsonl").read_text().count("\n") == 5
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what may come back from the GPU machine
    part = {
        name: json.loads((out / f"{name}.json").read_text()) for name in ("a_env", "d_dit", "b_launcher", "c_paper")
    }
    assert all(p["status"] == "ok" for p in part.values()), {k: p["status"] for k, p in part.items()}

    a = part["a_env"]
    assert a["matmul"]["tflops"] > 0 and a["attention"]["auto_resolves_to"] == "native"
    assert a["packages"]["deepspeed"]["version"] and a["packages"]["diffusers"]["version"]
    assert {"torch", "torch_cuda", "cuda_available", "cudnn"} <= set(a["torch_env"])

    d = part["d_dit"]
    ran = {k: v for k, v in d["backends"].items() if v["status"] == "ok"}
    assert "native" in ran and all(v["tflops_at_max_count"] > 0 and v["flops"] > 0 for v in ran.values())
    assert d["fastest"] in ran and isinstance(ran["native"]["mfu_vs_measured_ceiling"], float)

    b = part["b_launcher"]
    assert b["run"]["steps_logged"] == [1, 2, 3] and b["run"]["losses_finite"]
    assert b["run"]["checkpoints"] == ["step_00000002", "step_00000003"]
    assert b["run"]["export"]["transformer_layers"] == 4 and b["run"]["samples"]
    assert b["run"]["attention"] == "native" and b["run"]["device"] == "cpu"
    assert b["resume"]["reproduces"] and b["resume"]["bit_identical"] and b["resume"]["steps_compared"] == [3]

    c = part["c_paper"]
    assert set(c["plans_shipped_fresh"]) == {"tiny"}  # stale figures are recomputed in the background
    att = c["attempts"][0]
    assert att["plan_source"] != "unavailable"
    assert att["status"] == "ok" and att["name"] == "recipe" and len(att["rows"]) == 3
    cmp_ = att["comparison"]
    assert cmp_["timed_steps"] == [2]  # 1 is the warm-up, 3 the profiled row
    prof = att["profile"]
    assert prof["step"] == 3 and set(prof["phases_ms"]) == set(cmp_["phases"]) == set(prof["phase_top"])
    assert prof["top"] and "Self CPU" in (out / "c_profile.txt").read_text()
    assert set(cmp_["phases"]) == {"generator_dmd", "fake_score", "generator_gan", "discriminator"}
    for row in cmp_["phases"].values():
        assert row["time_s"] > 0 and row["planned_tflop"] > 0 and row["achieved_tflops"] is not None
        assert row["planned_peak_gib"] > 0
        # on the CPU the per-phase CUDA memory keys are absent or 0: reported as n/a, not as a number
        assert row["peak_alloc_gib"] == "n/a" or row["peak_alloc_gib"] > 0
    it = cmp_["iteration"]
    assert it["step_time_s"] > 0 and it["planned_tflop"] > 0 and it["nonfinite_total"] == 0
    assert isinstance(it["mfu_vs_measured_ceiling"], float) and it["ceiling_tflops"] == a["matmul"]["tflops"]
    assert (out / "c_rank0.log").read_text().count("world 1 = dp 1 x sp 1 on cpu") == 1


def test_the_planners_figures_can_be_recomputed():
    """What `--write-plans` and part c's background re-planning run: a broken import there would leave
    the GPU run comparing against figures of older sources."""
    plans = load_part("plans")
    fresh = plans.compute_plan("tiny")
    assert fresh["sources_sha256"] == plans.plan_sources_sha()
    assert fresh["peak_bytes"] > fresh["model_state_bytes"] > 0
    assert set(fresh["phase_flops"]) == {"generator_dmd", "fake_score", "generator_gan", "discriminator"}


def test_background_jobs_report_a_crash_and_b_waits_for_their_results(tmp_path, monkeypatch):
    """Part b's CPU work (the tiny workdir, FusedAdam's build) runs beside parts a and d: a job that dies
    without its result still leaves one (b stops waiting), and the script's hidden modes reach the jobs."""
    run = load_part("launcher_run")
    result = tmp_path / run.TINY_RESULT
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    run.watch_builder(proc, result, "tiny_workdir.log")
    made, waited = run.wait_result(result, 5)
    assert made["built"] is False and "exited with 3" in made["error"] and "tiny_workdir.log" in made["error"]
    assert waited < 5
    assert run.wait_result(tmp_path / "never.json", 1.2) == (None, pytest.approx(1.2, abs=1.0))

    script = load_script()
    seen = []
    monkeypatch.setattr(script, "prepare_tiny", lambda work: seen.append(("tiny", work)) or 0)
    monkeypatch.setattr(script, "build_fused_adam", lambda work: seen.append(("adam", work)) or 0)
    assert script.main(["--prepare-tiny", "--work", str(tmp_path)]) == 0
    assert script.main(["--build-fused-adam", "--work", str(tmp_path)]) == 0
    assert seen == [("tiny", tmp_path), ("adam", tmp_path)]
