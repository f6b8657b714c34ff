"""Stage 7: every model (the teacher, the DMD generator, the stage-6 rows) rendered on the same
held-out captions and seeds and measured with the frozen toy RAFT, beside the real clips; the
tables, plots and sample grids go to the results folder. Also the same with another RAFT
(`remeasure`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..measure import ToyMetrics, frame_bank, load_toy_raft, results_row, static_uniform_flow, true_flow
from ..render import render_videos
from ..tables import extra_table, paired_markdown, paired_table
from ..trainer_runs import exported, run_dirs
from ..workdir import REPO, STAGES

if TYPE_CHECKING:
    from ..workdir import WorkFolder

TITLE = "Toy-world MoGAN experiment (experiments/toy_motion)"


def run(exp: WorkFolder, r: dict) -> dict:
    return evaluate(exp, r, exp.raft_path, exp.dir("eval"))


def blob_kw(exp: WorkFolder) -> dict:
    """`measure.caption_target`'s speed bands from stage 1's world (the data recipe)."""
    world = exp.recipes["data"].get("world") or {}
    kw = {}
    if "speed_words" in world:
        kw["speed_words"] = tuple(world["speed_words"])
    if "speed" in world:
        kw["speed_range"] = tuple(world["speed"])
    return kw


def captions(held: list, r: dict) -> list[str]:
    """Stage 7's captions: r["prompts"] of the held-out clips', in order (repeating if fewer clips)."""
    return [held[i % len(held)][1]["caption"] for i in range(r["prompts"])]


def model_list(exp: WorkFolder) -> list[tuple[str, Path, bool]]:
    """(row name, transformer folder, whether it samples as the teacher) of every model measured."""
    models = [("teacher", exp.models / "wan" / "transformer", True)]
    return models + [(name, exported(run), False) for name, run in run_dirs(exp).items()]


def remeasure(exp: WorkFolder, raft_path: str | Path) -> dict:
    """Stage 7 on this work folder's trained models with another flow instrument (a toy RAFT
    state dict, e.g. a later run's stage 2): the GAN trained with this folder's RAFT, the
    measurements use `raft_path`. Per-video caches go to `<work>/eval_with_<sha>/`; the results
    folder gets the tables, plus the instrument's path, hash and readings on static uniform
    clips (stages.json, "flow_instrument")."""
    # The models are measured as they were trained: the folder's finished stages are taken
    # under the keys they recorded, even if a recipe has changed since (e.g. stage 2's, which is
    # the point of measuring them with another RAFT).
    for s in STAGES[:-1]:
        key = exp.recorded_key(s)
        if key is None:
            raise RuntimeError(f"stage {s} has not finished in {exp.work}: nothing to re-measure")
        exp.keys[s] = key
    raft_path = Path(raft_path).resolve()
    sha = hashlib.sha256(raft_path.read_bytes()).hexdigest()
    size = exp.recipes["data"]["size"]
    instrument = {
        "path": str(raft_path.relative_to(REPO)) if raft_path.is_relative_to(REPO) else str(raft_path),
        "sha256": sha,
        "static_uniform_flow": static_uniform_flow(load_toy_raft(raft_path, exp.device), size),
    }
    return evaluate(exp, exp.recipes["eval"], raft_path, exp.dir(f"eval_with_{sha[:12]}"), instrument)


def evaluate(exp: WorkFolder, r: dict, raft_path: Path, d: Path, instrument: dict | None = None) -> dict:
    """Stage 7's work: every model rendered on the same captions and seeds, measured with the
    RAFT at `raft_path`, per-video records cached in `d`; tables, plots and grids to the results."""
    from mogan_ds.eval.report import bar_chart, results_markdown

    from ..plots import curves_png, pretraining_png, sample_grid_png

    res = exp.results
    res.mkdir(parents=True, exist_ok=True)
    fps = exp.recipes["data"]["fps"]
    f = exp.clip_frames()
    held = exp.clips("heldout")
    train = exp.clips("train")
    texts = captions(held, r)
    raft = load_toy_raft(raft_path, exp.device)
    bank = frame_bank([c[:f] for c, _ in train], r["nearest_size"])
    metrics = ToyMetrics(raft, fps, bank, r["nearest_size"])
    metrics.blob_kw = blob_kw(exp)
    cfg = exp.trainer_config("dmd")
    rows, grids, per_video = [], {}, {}
    # The data's own row: the real held-out clips through the same metrics (the target motion).
    real = [held[i % len(held)][0][:f] for i in range(r["prompts"])]
    data_recs = [metrics.video(v, texts[i]) for i, v in enumerate(real)]
    rows.append(results_row("data (held-out real)", data_recs, metrics.weights, r["bootstrap"]))
    # The instrument's calibration on the real row: what the renderer says the clips move.
    exact = [held[i % len(held)][1] for i in range(r["prompts"])]
    rows[-1]["mean_flow_magnitude_exact"] = float(
        np.mean([float(true_flow(m, t).norm(dim=0).mean()) for m in exact for t in range(f - 1)])
    )
    grids["data"] = real[: r["grid_prompts"]]
    for name, path, teacher in model_list(exp):
        cache = d / f"{name}.json"
        if cache.is_file():
            recs = json.loads(cache.read_text())
            videos = render_videos(exp, path, teacher, texts[: r["grid_prompts"]], [r["seeds"][0]], cfg)
        else:
            videos = render_videos(exp, path, teacher, texts, list(r["seeds"]), cfg)
            # video k has caption k % len(texts) (seed-major)
            recs = [metrics.video(v, texts[k % len(texts)]) for k, v in enumerate(videos)]
            cache.write_text(json.dumps(recs))
        rows.append(results_row(name, recs, metrics.weights, r["bootstrap"]))
        per_video[name] = recs
        grids[name] = videos[: r["grid_prompts"]]

    paired = paired_table(per_video, r["bootstrap"])
    (res / "results.json").write_text(json.dumps(rows, indent=1))
    (res / "paired.json").write_text(json.dumps(paired, indent=1))
    md = results_markdown(rows, TITLE) + "\n" + extra_table(rows, r, exp) + paired_markdown(paired)
    if instrument is not None:
        md += (
            "\nRe-measured: every row above was measured with the toy RAFT at "
            f"`{instrument['path']}` (sha256 {instrument['sha256'][:12]}), not the one the GAN trained "
            f"with; on static uniform clips it reads {instrument['static_uniform_flow']} px/frame. The "
            "VAE ceiling above is the training run's own stage-3 figure (its RAFT).\n"
        )
    (res / "results.md").write_text(md)
    bar_chart(rows, res / "results.png")
    curves_png(run_dirs(exp), res / "training_curves.png")
    pretraining_png(exp.work, res / "pretraining_curves.png")
    for p in range(r["grid_prompts"]):
        rows_v = {k: v[p] for k, v in grids.items()}
        sample_grid_png(rows_v, raft, texts[p], res / f"samples_prompt{p}.png")
    reports = {s: exp.report(s) for s in STAGES[:-1]}
    if instrument is not None:
        reports["flow_instrument"] = instrument
    (res / "stages.json").write_text(json.dumps(reports, indent=1))
    return {
        row["model"]: {k: row[k] for k in ("dynamics_degree", "motion_smoothness", "mean_flow_magnitude")}
        for row in rows
    }
