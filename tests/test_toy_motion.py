"""The toy-world experiment (experiments/toy_motion).

- End to end at its smoke size (smoke.yaml): every stage for real (data, RAFT, VAE, teacher, DMD
  and MoGAN through launch/train.py, evaluation) on the smallest counts, each writing its
  artefacts, and a second run finds every stage cached. Nothing is trained enough to measure.
- Re-measuring with another RAFT (`Experiment.remeasure`) reproduces stage 7 with stage 2's own RAFT.
- The committed flow instrument (results/raft_small.pth, the full run's stage 2): it beats the
  zero-flow baseline on the held-out split stage 1's recipe renders and reads no motion on static
  uniform clips.
"""

import json
import math
import shutil
import sys

import pytest

from mogan_ds.cli.launcher import REPO

sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from experiments.toy_motion.pipeline import Experiment

    work = tmp_path_factory.mktemp("toy_motion")
    exp = Experiment(work, "smoke", work / "results", echo=lambda *_: None)
    return exp, exp.run()


@pytest.mark.slow
def test_every_stage_writes_its_artefacts(smoke):
    exp, reports = smoke
    w = exp.work
    assert all(reports[s] is not None for s in reports)
    assert len(list((w / "data" / "train").glob("*.tar"))) == 2 and list((w / "data" / "heldout").glob("*.tar"))
    assert json.loads((w / "data" / "prompts" / "meta.json").read_text())["num_prompts"] == 6
    assert reports["data"]["world"]["textured"] and reports["data"]["mean_true_flow_magnitude"] > 0
    raft = reports["raft"]
    assert (w / "raft" / "raft_small.pth").is_file() and (exp.results / "raft_small.pth").is_file()
    assert raft["heldout_pairs"] == 4 and raft["zero_flow_epe"] > 0
    assert all(math.isfinite(raft[f"heldout_epe_iters{i}"]) for i in (4, 20))
    assert set(raft["static_uniform_flow"]) == {"uniform_0", "uniform_20", "uniform_128", "uniform_128_dimming"}
    assert all(math.isfinite(v) and v >= 0 for v in raft["static_uniform_flow"].values())
    assert (w / "vae" / "vae" / "config.json").is_file() and math.isfinite(reports["vae"]["heldout_psnr_db"])
    per_frame = reports["vae"]["heldout_psnr_per_frame_db"]
    assert len(per_frame) == exp.clip_frames() and all(math.isfinite(p) for p in per_frame)
    with pytest.raises(ValueError, match="vae.train_frames=5"):  # a window short of the clip is refused
        exp.stage_vae({**exp.recipes["vae"], "train_frames": 5})
    assert (w / "models" / "wan" / "model_index.json").is_file()
    assert (w / "models" / "generator" / "config.json").is_file()
    assert math.isfinite(reports["teacher"]["final_loss_last50"])
    for run in ("dmd/run", "mogan/mogan"):
        assert (w / run / "export" / "transformer" / "config.json").is_file(), run
        assert (w / run / "metrics.jsonl").is_file(), run
    assert "dmd_loss" in reports["dmd"] and "g_gan_loss" not in reports["dmd"]  # gan.enabled=false
    assert "d_loss" in reports["mogan"]["mogan"] and "dmd_loss" in reports["mogan"]["mogan"]
    rows = json.loads((exp.results / "results.json").read_text())
    assert [r["model"] for r in rows] == ["data (held-out real)", "teacher", "dmd", "mogan"]
    for r in rows:
        assert r["num_videos"] == 1 and 0.0 <= r["dynamics_degree"] <= 1.0 and 0.0 < r["motion_smoothness"] <= 1.0
        lo, hi = r["mean_flow_magnitude_ci95"]  # rounded to 4 decimals; one video: both ends are its value
        assert lo - 1e-4 <= r["mean_flow_magnitude"] <= hi + 1e-4
    assert "| mogan | 1 |" in (exp.results / "results.md").read_text()
    # the real row carries its exact flow (from the renderer's geometry) beside the measured one
    assert rows[0]["mean_flow_magnitude_exact"] > 0 and "exact mean flow" in (exp.results / "results.md").read_text()
    # paired with the DMD row over the same (single) video: the difference of the two rows' values
    paired = json.loads((exp.results / "paired.json").read_text())["dmd"]
    by = {r["model"]: r for r in rows}
    d = paired["mogan"]["mean_flow_magnitude"]
    assert d["videos"] == 1 and "dmd" not in paired
    assert abs(d["mean"] - (by["mogan"]["mean_flow_magnitude"] - by["dmd"]["mean_flow_magnitude"])) < 1e-3
    for png in ("results.png", "training_curves.png", "pretraining_curves.png", "samples_prompt0.png"):
        assert (exp.results / png).stat().st_size > 1000, png


# The results folders are committed: no file in them over ~1 MB but the kept models, i.e. the flow
# instrument stage 2 copies there (results/raft_small.pth, which kept/raft links to).
RESULTS_FILE_LIMIT = 1 << 20
KEPT_MODELS = {"raft_small.pth"}


def oversized(results) -> dict[str, int]:
    files = (p for p in results.rglob("*") if p.is_file() and str(p.relative_to(results)) not in KEPT_MODELS)
    return {str(p.relative_to(results)): p.stat().st_size for p in files if p.stat().st_size > RESULTS_FILE_LIMIT}


@pytest.mark.slow
def test_a_run_writes_no_large_file_to_its_results_but_kept_models(smoke):
    exp, _ = smoke
    assert (exp.results / "samples_prompt0.png").is_file() and not oversized(exp.results)


def test_committed_results_hold_no_large_file_but_kept_models():
    from experiments.toy_motion.pipeline import HERE

    assert not oversized(HERE / "results")


@pytest.mark.slow
def test_a_second_run_finds_every_stage_cached(smoke):
    from experiments.toy_motion.pipeline import STAGES, Experiment

    exp, reports = smoke
    lines = []
    again = Experiment(exp.work, "smoke", exp.results, echo=lines.append).run()
    assert again == reports
    assert lines == [f"[toy] {s}: done (cached in {exp.work / s})" for s in STAGES]


@pytest.mark.slow
def test_a_saved_stage_is_reused_by_a_new_work_folder_only_under_its_recipes(smoke, tmp_path):
    # A long stage's models kept outside the work folder (--save-stage, without the training
    # checkpoint) are taken as a fresh folder's finished stage when its recipes match, and the
    # stages after it build on them; a folder made by other recipes is refused, naming the stages.
    from experiments.toy_motion.pipeline import Experiment
    from experiments.toy_motion.run import main

    exp, reports = smoke
    saved = exp.save_stage("vae", tmp_path / "saved_vae")
    assert (saved / "vae" / "config.json").is_file() and (saved / "curve.json").is_file()
    assert not (saved / "ckpt.pt").exists() and (exp.work / "vae" / "ckpt.pt").is_file()
    with pytest.raises(FileExistsError):
        exp.save_stage("vae", saved)
    with pytest.raises(RuntimeError, match="stage teacher has not finished"):
        Experiment(tmp_path / "empty", "smoke").save_stage("teacher", tmp_path / "t")

    fresh = Experiment(tmp_path / "fresh", "smoke", echo=lambda *_: None)
    fresh.reuse_stage("vae", saved)
    assert fresh.done("vae")["report"] == reports["vae"] and fresh.done("data") is None
    other = Experiment(tmp_path / "other", "smoke", echo=lambda *_: None)
    other.keys = {**other.keys, "vae": "another recipe"}
    with pytest.raises(ValueError, match="stages data, raft, vae"):
        other.reuse_stage("vae", saved)
    with pytest.raises(FileNotFoundError, match="no finished stage"):
        fresh.reuse_stage("teacher", tmp_path / "empty")
    # the teacher's stage carries the WanPipeline release it writes beside its folder
    teacher = exp.save_stage("teacher", tmp_path / "saved_teacher")
    assert (teacher / "beside" / "models" / "wan" / "model_index.json").is_file()
    assert not (teacher / "latents.pt").exists() and (exp.work / "teacher" / "latents.pt").is_file()
    fresh.reuse_stage("teacher", teacher)
    assert fresh.done("teacher")["report"] == reports["teacher"] and not (fresh.work / "teacher" / "beside").exists()
    for f in ("wan/transformer/config.json", "generator/config.json"):
        assert (fresh.work / "models" / f).read_bytes() == (exp.work / "models" / f).read_bytes(), f
    shutil.rmtree(teacher / "beside")
    with pytest.raises(FileNotFoundError, match="lacks what stage teacher writes beside"):
        Experiment(tmp_path / "third", "smoke").reuse_stage("teacher", teacher)
    # through the command: the reused stage is cached, the stages before it run
    argv = ["--scale", "smoke", "--work", str(tmp_path / "cli"), "--stages", "data", "vae"]
    assert main([*argv, "--reuse-stage", f"vae={saved}", "--save-stage", f"data={tmp_path / 'saved_data'}"]) == 0
    again = Experiment(tmp_path / "cli", "smoke")
    assert again.done("vae")["report"] == reports["vae"] and again.done("data")["report"]["train_clips"] > 0
    assert (tmp_path / "saved_data" / "done.json").is_file()
    with pytest.raises(SystemExit):
        main([*argv, "--reuse-stage", f"vea={saved}"])


@pytest.mark.slow
def test_remeasure_with_the_stage2_raft_reproduces_stage7(smoke, tmp_path):
    # Re-measuring the finished models with the RAFT they trained with gives stage 7's table back
    # (same captions, seeds, metrics), even when a recipe key no longer matches (the keys the
    # stages recorded are the ones used), and records which instrument measured.
    import hashlib

    from experiments.toy_motion.pipeline import Experiment

    exp, _ = smoke
    again = Experiment(exp.work, "smoke", tmp_path / "res", echo=lambda *_: None)
    again.keys = {s: "changed since" for s in again.keys}
    raft = exp.work / "raft" / "raft_small.pth"
    again.remeasure(raft)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "weights"} for r in rows]  # noqa: E731
    want = json.loads((exp.results / "results.json").read_text())
    got = json.loads((tmp_path / "res" / "results.json").read_text())
    assert strip(got) == strip(want)
    inst = json.loads((tmp_path / "res" / "stages.json").read_text())["flow_instrument"]
    sha = hashlib.sha256(raft.read_bytes()).hexdigest()
    assert inst["sha256"] == sha and (exp.work / f"eval_with_{sha[:12]}").is_dir()
    assert "Re-measured" in (tmp_path / "res" / "results.md").read_text()
    with pytest.raises(RuntimeError, match="nothing to re-measure"):
        Experiment(tmp_path / "empty", "smoke", tmp_path / "r2").remeasure(raft)


@pytest.mark.slow
def test_probe_d_reads_the_stage6_discriminator_on_every_category(smoke, tmp_path):
    # The D probe (experiments/toy_motion/probe_d.py) on the smoke run's step-1 checkpoint: every
    # held-out kind is scored with the clips the metadata says it has, the dimmed clips' intensity
    # is the factor times the originals', and the generator's videos are stage 7's captions x seeds.
    from experiments.toy_motion.pipeline import load_clips
    from experiments.toy_motion.probe_d import main

    exp, _ = smoke
    w = exp.work
    out = tmp_path / "probe"
    argv = ["--work", str(w), "--run", str(w / "mogan" / "mogan"), "--scale", "smoke", "--dim", "0.5"]
    assert main([*argv, "--model", f"dmd={w / 'dmd' / 'run' / 'export' / 'transformer'}", "--out", str(out)]) == 0
    res = json.loads((out / "probe_d.json").read_text())
    cats = res["categories"]
    assert res["checkpoint"] == "step_00000001" and res["windows"] == [0, 1]
    kinds = [m["kind"] for _, m in load_clips(w / "data" / "heldout")]
    for kind in set(kinds):
        assert cats[f"real: {kind}"]["clips"] == kinds.count(kind)
    moving = [c for c in cats if c.startswith("real: ") and c != "real: static"]
    n_moving = sum(cats[c]["clips"] for c in moving)
    mean_intensity = sum(cats[c]["intensity"] * cats[c]["clips"] for c in moving) / n_moving
    assert cats["real, moving, dimmed x0.5"]["clips"] == n_moving
    assert cats["real, moving, dimmed x0.5"]["intensity"] == pytest.approx(0.5 * mean_intensity, abs=2e-4)
    r = exp.recipes["eval"]
    assert cats["generated: dmd"]["clips"] == r["prompts"] * len(r["seeds"])
    for s in cats.values():
        assert all(math.isfinite(v) for v in s.values()) and 0 < s["p_real"] < 1 and s["flow"] >= 0
    assert "| generated: dmd |" in (out / "probe_d.md").read_text()
    with pytest.raises(SystemExit):
        main([*argv, "--model", "no_equals_sign"])


def test_psnr_db_matches_hand_values_for_floats_and_tensors():
    import numpy as np
    import torch

    from experiments.toy_motion.measure import frame_bank, nearest_psnr, psnr_db

    # uint8 frames off by 1 everywhere: 20 log10(255) = 48.13 dB; [-1, 1] signal off by 0.02: 40 dB
    assert psnr_db(1.0, peak=255.0) == pytest.approx(48.1308, abs=1e-4)
    assert float(psnr_db(torch.tensor(4e-4), peak=2.0)) == pytest.approx(40.0, abs=1e-4)
    assert psnr_db(0.0, peak=1.0) == pytest.approx(100.0)  # floored, finite
    # nearest real frame: a bank holding the frames themselves plus a far frame reads > 60 dB
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    bank = frame_bank([frames, np.zeros_like(frames)], 16)
    assert nearest_psnr(frames, bank, 16) > 60
    shifted = frame_bank([np.clip(frames.astype(int) + 51, 0, 255).astype(np.uint8)], 16)
    assert nearest_psnr(frames, shifted, 16) < 20


def test_static_pairs_are_flat_or_smooth_at_zero_flow():
    import torch

    from experiments.toy_motion.measure import static_pairs

    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(5, 3, 128, 128) * 2 - 1
    a, b, gt = static_pairs(64, 128, frames, gen, gain=0.15)
    assert a.shape == b.shape == (64, 3, 128, 128) and gt.shape == (64, 2, 128, 128)
    assert not gt.any() and a.abs().max() <= 1 and b.abs().max() <= 1
    # flat: one colour per frame; smooth: low-frequency (neighbouring pixels nearly equal)
    flat = a.flatten(2).std(2).amax(1) < 1e-6
    assert 16 < int(flat.sum()) < 48
    assert float((a[~flat, :, :, 1:] - a[~flat, :, :, :-1]).abs().max()) < 0.1
    # frame t+1 is frame t under one brightness gain in [0.85, 1.15] (on intensity in [0, 2])
    ratio = (b + 1) / (a + 1).clamp_min(1e-3)
    ok = (a + 1 > 0.05) & (b < 0.999)  # away from black (ratio ill-defined) and from clipping
    checked = 0
    for i in range(64):
        r = ratio[i][ok[i]]
        if r.numel():
            checked += 1
            assert 0.85 - 1e-3 <= float(r.min()) and float(r.max()) <= 1.15 + 1e-3
            assert float(r.max() - r.min()) < 1e-2
    assert checked > 48


def test_kept_stages_are_reusable_under_the_recipes_on_main(tmp_path):
    # experiments/toy_motion/kept/ holds stages 2 and 3 (experiments/toy_motion/README.md, "Caching,
    # reuse and kept stages"): a full-size work folder takes them only while their keys are main's
    # recipes' keys, so a change to the recipes of stages 1-3 fails here until the stages are saved
    # again. The kept RAFT is the committed one.
    import hashlib

    from diffusers import AutoencoderKLWan

    from experiments.toy_motion.pipeline import HERE, Experiment

    kept = HERE / "kept"
    exp = Experiment(tmp_path / "work", "full", echo=lambda *_: None)
    for stage in ("raft", "vae"):
        exp.reuse_stage(stage, kept / stage)
        assert exp.done(stage) is not None, stage
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert sha(exp.work / "raft" / "raft_small.pth") == sha(HERE / "results" / "raft_small.pth")
    vae = AutoencoderKLWan.from_pretrained(exp.work / "vae" / "vae")
    arch = exp.recipes["vae"]["arch"]
    assert vae.config.base_dim == arch["base_dim"] and vae.config.z_dim == arch["z_dim"]
    assert len(vae.config.latents_mean) == arch["z_dim"]  # stage 3 measured the latent statistics
    assert not any(p.name == "ckpt.pt" for p in kept.rglob("*"))  # models only, no training state


def test_committed_toy_raft_reads_no_motion_on_static_uniform_clips():
    # The instrument's artefact the second toy run found (~3 px/frame on flat clips): gone.
    from experiments.toy_motion.measure import load_toy_raft, static_uniform_flow
    from experiments.toy_motion.pipeline import HERE

    flows = static_uniform_flow(load_toy_raft(HERE / "results" / "raft_small.pth"), 128)
    assert max(flows.values()) < 0.25, flows


def test_committed_toy_raft_beats_zero_flow_on_heldout(tmp_path):
    # The first held-out clips exactly as stage 1 renders them (the renderer draws clip by clip
    # from one seeded generator, so a shorter corpus is a prefix), through the same mp4 encoding.
    import torch

    from experiments.toy_motion.measure import flow_pairs, heldout_epe, load_toy_raft
    from experiments.toy_motion.pipeline import HELDOUT_SEED_OFFSET, HERE, load_clips, load_recipe
    from mogan_ds.data.synthetic import write_synthetic_corpus

    torch.set_num_threads(1)
    r = load_recipe("data")
    write_synthetic_corpus(
        str(tmp_path),
        num_clips=4,
        frames=r["frames"],
        size=(r["size"], r["size"]),
        fps=r["fps"],
        shards=1,
        seed=r["seed"] + HELDOUT_SEED_OFFSET,
        world=r["world"],
        echo=lambda *_: None,
    )
    clips = load_clips(tmp_path)
    assert sum(m["kind"] != "static" for _, m in clips) >= 2  # the check needs motion to be wrong about
    a, b, gt = flow_pairs(clips, 12)
    rep = heldout_epe(load_toy_raft(HERE / "results" / "raft_small.pth"), a, b, gt, iters=(20,))
    # Clearly better than predicting no motion, everywhere and on the moving pixels alone.
    assert rep["heldout_epe_iters20"] < 0.7 * rep["zero_flow_epe"], rep
    assert rep["heldout_epe_moving_pixels_iters20"] < 0.7 * rep["zero_flow_epe_moving_pixels"], rep


def test_textured_world_exact_flow_is_rafts_convention():
    # The ground truth stage 2 trains on: backward-warping frame t+1 by the exact flow (RAFT's
    # convention, frame t -> t+1 in pixels) gives back frame t on the moving pixels; zero flow
    # and the negated flow do not. Stage 1's world, rendered directly (no mp4).
    import numpy as np
    import torch

    from experiments.toy_motion.measure import to_unit, true_flow
    from experiments.toy_motion.pipeline import load_recipe
    from mogan_ds.data.synthetic import render_clip
    from mogan_ds.eval.amt import warp

    r = load_recipe("data")
    rng = np.random.default_rng(7)
    errs = {"exact": [], "zero": [], "negated": []}
    for _ in range(6):
        video, truth = render_clip(rng, 3, r["size"], r["size"], r["world"])
        truth.update(height=r["size"], width=r["size"])
        a, b = to_unit(video[0])[None] * 0.5 + 0.5, to_unit(video[1])[None] * 0.5 + 0.5
        flow = true_flow(truth, 0)[None]
        moving = flow.norm(dim=1) > 0.5
        if not moving.any():
            continue
        for name, f in (("exact", flow), ("zero", torch.zeros_like(flow)), ("negated", -flow)):
            errs[name].append(float((warp(b, f) - a).abs().mean(1)[moving].mean()))
    assert len(errs["exact"]) >= 3, errs
    exact, zero, negated = (float(np.mean(v)) for v in errs.values())
    assert exact < 0.4 * zero and zero < negated, (exact, zero, negated)
