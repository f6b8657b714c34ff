"""Stage 4: the teacher, a small Wan transformer trained by flow matching on the VAE's latents
of the corpus; saved as the WanPipeline release every later stage loads (models/), and its CFG
samples on held-out captions measured against the data's motion."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..clips import clip_window, encode_mode
from ..measure import ToyMetrics, load_toy_raft
from ..render import embed, render_videos, text_models
from ..training import atomic_save, autocast, fit, seed_all, warmup_cosine

if TYPE_CHECKING:
    from ..workdir import WorkFolder


def run(exp: WorkFolder, r: dict) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from mogan_ds.losses.flow_matching import flow_matching_loss
    from mogan_ds.sampling.samplers import normalize_latents, transformer_velocity_fn
    from mogan_ds.sampling.schedule import FlowMatchSchedule

    d = exp.dir("teacher")
    gen = seed_all(r["seed"])
    train = exp.clips("train")
    dev = exp.device
    vae = AutoencoderKLWan.from_pretrained(exp.work / "vae" / "vae").float().eval().requires_grad_(False).to(dev)
    f = exp.clip_frames()
    lat_path = d / "latents.pt"
    if lat_path.is_file():
        lat = torch.load(lat_path, weights_only=True)
    else:
        xs, idx = [], []
        for i, (clip, _) in enumerate(train):
            for s in r["window_starts"]:
                xs.append(clip_window(clip, s, f))
                idx.append(i)
        with torch.no_grad():
            lat = {"x0": normalize_latents(vae, encode_mode(vae, xs)).cpu(), "clip": torch.tensor(idx)}
        atomic_save(lat, lat_path)
    embeds, negative = embed(exp, [m["caption"] for _, m in train])
    arch = dict(r["arch"], patch_size=tuple(r["arch"]["patch_size"]))
    model = WanTransformer3DModel(**arch).float().train().to(dev)
    x0_all, embeds_dev, negative_dev = lat["x0"].to(dev), embeds.to(dev), negative.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
    fn = transformer_velocity_fn(model)
    n = len(lat["x0"])

    def step_fn(step: int):
        i = torch.randint(n, (r["batch_size"],), generator=gen)
        # Every draw on the CPU generator (the same batches on any device), then moved.
        x0 = x0_all[i.to(dev)]
        cond = embeds_dev[lat["clip"][i].to(dev)].clone()
        drop = torch.rand(len(i), generator=gen) < r["cfg_dropout"]
        cond[drop.to(dev)] = negative_dev[0]
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        sigma = FlowMatchSchedule.shift_sigma(torch.rand(len(i), generator=gen), r["shift"]).to(dev)
        x_t = FlowMatchSchedule.add_noise(x0, eps, sigma)
        # bf16 autocast on CUDA for the DiT's forward (fp32 master weights, AdamW state and
        # flow-matching loss); nothing on the CPU.
        with autocast(dev):
            v = fn(x_t, sigma * 1000.0, cond)
        loss, _ = flow_matching_loss(v, x0, eps)
        return loss, {"loss": loss.item()}

    curve = fit(d / "ckpt.pt", r, model, opt, warmup_cosine(opt, r), gen, step_fn, "teacher", exp.echo)
    model.eval().requires_grad_(False)
    (d / "curve.json").write_text(json.dumps(curve))
    # The release every later stage loads: WanPipeline layout with the trained teacher and
    # VAE and the tiny UMT5; the generator starts as the teacher (the DMD warm-up start).
    tok, enc = text_models(exp)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=r["shift"]
    )
    models = exp.models
    WanPipeline(tokenizer=tok, text_encoder=enc, vae=vae, scheduler=scheduler, transformer=model).save_pretrained(
        models / "wan"
    )
    model.save_pretrained(models / "generator")
    # Does the teacher move like the data? Its CFG samples on held-out captions.
    held = exp.clips("heldout")[: r["report_prompts"]]
    texts = [m["caption"] for _, m in held]
    from .evaluate import blob_kw

    metrics = ToyMetrics(load_toy_raft(exp.raft_path, dev), exp.recipes["data"]["fps"])
    metrics.blob_kw = blob_kw(exp)
    cfg = exp.trainer_config("dmd")
    videos = render_videos(exp, models / "wan" / "transformer", True, texts, [0], cfg)
    recs = [metrics.video(v, t) for v, t in zip(videos, texts)]
    data = [metrics.video(c[:f], t) for (c, _), t in zip(held, texts)]

    def blob(rs: list[dict], col: str):
        vals = [x[col] for x in rs if x.get(col) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    return {
        "steps_done": curve[-1]["step"] if curve else 0,
        "final_loss_last50": round(float(np.mean([c["loss"] for c in curve[-50:]])), 4),
        "samples": len(recs),
        "teacher_mean_flow_magnitude": round(float(np.mean([x["mean_flow_magnitude"] for x in recs])), 4),
        "data_mean_flow_magnitude": round(float(np.mean([x["mean_flow_magnitude"] for x in data])), 4),
        "teacher_dynamic_fraction": round(float(np.mean([x["dynamic"] for x in recs])), 4),
        "data_dynamic_fraction": round(float(np.mean([x["dynamic"] for x in data])), 4),
        # Does it draw the captioned object travelling as captioned (measure.blob_motion)?
        **{f"teacher_{c}": blob(recs, c) for c in ("blob_found_fraction", "blob_direction_match", "blob_speed_ratio")},
        **{f"data_{c}": blob(data, c) for c in ("blob_found_fraction", "blob_direction_match", "blob_speed_ratio")},
    }
