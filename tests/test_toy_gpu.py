"""The toy experiment's GPU preparation, checked on the CPU in seconds: device and autocast
selection, the gpu scale's recipes, the captioned-object (blob) measurement on clips with known
motion, the training loop's time limit, kept-stage bundles and the parallel data stage."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
import yaml

from experiments.toy_motion.bundle import pack, unpack
from experiments.toy_motion.measure import blob_motion, caption_target
from experiments.toy_motion.training import autocast, fit, pick_device
from experiments.toy_motion.workdir import HERE, load_recipe, stage_keys


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    auto = pick_device(None)
    assert auto == pick_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            pick_device("cuda")


def test_autocast_bf16_on_cuda_only():
    with autocast("cpu"):  # the CPU path: no autocast at all, fp32 as before
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = autocast("cuda")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast("cuda", enabled=False), torch.autocast)


def test_gpu_scale_recipes():
    full = {s: load_recipe(s, "full") for s in ("data", "raft", "vae", "teacher", "dmd", "mogan", "eval")}
    gpu = {s: load_recipe(s, "gpu") for s in full}
    assert gpu["data"]["train_clips"] > full["data"]["train_clips"] and gpu["data"]["parallel_shards"]
    # the same held-out split as every CPU run: the same captions and clips for every row
    for k in ("heldout_clips", "seed", "frames", "size", "world"):
        assert gpu["data"][k] == full["data"][k]
    t = gpu["teacher"]
    width = t["arch"]["num_attention_heads"] * t["arch"]["attention_head_dim"]
    assert width > 128 and t["time_limit_s"] < 600 and t["report_prompts"] == full["data"]["heldout_clips"]
    assert all(gpu[s]["time_limit_s"] < 600 for s in ("raft", "vae", "teacher"))
    assert gpu["dmd"]["overrides"] and gpu["eval"]["prompts"] == full["data"]["heldout_clips"]
    assert stage_keys(gpu)["data"] != stage_keys(full)["data"]
    with pytest.raises(ValueError, match="scale"):
        load_recipe("data", "tpu")


def test_caption_target():
    t = caption_target("a red circle moving down-left quickly on a black background")
    assert t["colour"] == "red" and t["background"] == "black"
    assert t["direction"] == pytest.approx([-math.sqrt(0.5), math.sqrt(0.5)]) and t["speed"] == 10.0
    assert caption_target("a blue square moving up slowly on a teal background")["speed"] == 4.0
    # a pan moves the object with the scene, the other way; no speed word
    p = caption_target("a green circle on a gray patterned background, the camera pans left")
    assert p["direction"] == pytest.approx([1.0, 0.0]) and p["speed"] is None
    s = caption_target("a white square resting on a teal background, static camera")
    assert s["direction"] is None and s["speed"] == 0.0


def test_blob_motion_on_clips_with_known_motion():
    from mogan_ds.data.synthetic import render_clip

    world = yaml.safe_load((HERE / "stage1_data.yaml").read_text())["world"]
    rng = np.random.default_rng(1000)
    errs, found, matched, frozen = [], [], [], None
    for _ in range(16):
        video, truth = render_clip(rng, 9, 128, 128, world)
        b = blob_motion(video, truth["caption"])
        if not b["blob_scored"]:
            assert "white" in truth["caption"]  # white on gray: the colour mask cannot tell them apart
            continue
        found.append(b["blob_found_fraction"])
        o = truth["objects"][0]
        if b["blob_found_fraction"] == 1.0:
            errs.append(math.hypot(b["blob_velocity"][0] - o["vx"], b["blob_velocity"][1] - o["vy"]))
        if b["blob_direction_match"] is not None:
            matched.append(b["blob_direction_match"])
            if "moving" in truth["caption"] and b["blob_found_fraction"] == 1.0:
                frozen = (video, truth["caption"])
        if truth["kind"] == "static":
            assert b["blob_static_speed"] == pytest.approx(0.0, abs=0.1)
    assert np.mean(found) > 0.85 and len(errs) >= 8
    assert np.median(errs) < 0.5 and max(errs) < 1.5  # px/frame against the exact velocity
    assert np.mean(matched) > 0.85
    # a moving object frozen in place: found, but not moving as captioned
    video, caption = frozen
    b = blob_motion(np.repeat(video[:1], 9, axis=0), caption)
    assert b["blob_found_fraction"] == 1.0 and b["blob_direction_match"] == 0.0 and abs(b["blob_along"]) < 0.1
    # nothing drawn: nothing found
    b = blob_motion(np.full((9, 128, 128, 3), 15, np.uint8), "a red circle moving left quickly on a black background")
    assert b["blob_found_fraction"] == 0.0 and b["blob_direction_match"] == 0.0


def test_fit_time_limit(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    r = {"steps": 1000, "grad_clip": 1.0, "checkpoint_every": 500, "time_limit_s": 0.0}

    def step_fn(step):
        loss = model(torch.ones(1, 2)).pow(2).mean()
        return loss, {"loss": loss.item()}

    curve = fit(tmp_path / "ckpt.pt", r, model, opt, sched, torch.Generator(), step_fn, "t", lambda *_: None)
    assert len(curve) == 1 and torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 1


def test_bundle_roundtrip(tmp_path):
    a = tmp_path / "saved" / "teacher"
    (a / "beside" / "models" / "wan").mkdir(parents=True)
    (a / "beside" / "models" / "generator").mkdir(parents=True)
    blob = np.random.default_rng(0).bytes(50_000)
    (a / "beside" / "models" / "wan" / "w.bin").write_bytes(blob)
    (a / "beside" / "models" / "generator" / "w.bin").write_bytes(blob)  # the same weights twice
    (a / "done.json").write_text(json.dumps({"key": "k"}))
    parts = pack(tmp_path / "out" / "kept.tar", [a], part_bytes=20_000)
    assert len(parts) > 1 and sum(p.stat().st_size for p in parts) < 80_000  # stored once
    (top,) = unpack(tmp_path / "out" / "kept.tar", tmp_path / "back")
    assert (top / "beside" / "models" / "generator" / "w.bin").read_bytes() == blob
    assert json.loads((top / "done.json").read_text()) == {"key": "k"}


def test_parallel_data_shards(tmp_path):
    from experiments.toy_motion.clips import load_clips
    from experiments.toy_motion.stages.data import parallel_train

    r = {"train_clips": 5, "shards": 2, "size": 32, "frames": 3, "fps": 8, "seed": 0, "world": None}
    parallel_train(tmp_path, r, lambda *_: None)
    clips = load_clips(tmp_path / "train")
    captions = (tmp_path / "train.txt").read_text().splitlines()
    assert len(clips) == 5 and [m["caption"] for _, m in clips] == captions
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["000000.tar", "000001.tar"]
