"""Stage 3: the Wan VAE (a small one) trained on the corpus, its latent statistics measured as
the normalisation the trainer applies, and its reconstructions of held-out clips measured
(PSNR, and RAFT flow against the originals': the ceiling of every decoded row)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..clips import clip_window, encode_mode
from ..measure import clip_flow, flow_per_pair, load_toy_raft, psnr_db
from ..training import autocast, fit, seed_all, warmup_cosine

if TYPE_CHECKING:
    from ..workdir import WorkFolder


def run(exp: WorkFolder, r: dict) -> dict:
    from diffusers import AutoencoderKLWan

    from mogan_ds.sampling.samplers import decode_to_uint8, normalize_latents

    d = exp.dir("vae")
    gen = seed_all(r["seed"])
    train = exp.clips("train")
    held = exp.clips("heldout")
    dev = exp.device
    vae = AutoencoderKLWan(**r["arch"]).float().train().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=r["lr"], weight_decay=0.0)
    nf, f, tf, crop = train[0][0].shape[0], exp.clip_frames(), r["train_frames"], r["crop"]
    if tf < f:
        # Wan's VAE is causal over latent chunks: a chunk past the training window decodes out of
        # distribution (the third run's VAE lost ~7 dB there), and the trainer decodes every chunk.
        raise ValueError(f"vae.train_frames={tf} is shorter than the trainer's clip (video.num_frames={f})")
    size = train[0][0].shape[1]

    def step_fn(step: int):
        # Random crops of short windows: the VAE is convolutional (its mid-block attention
        # is per frame), so crops train the same weights at a fraction of the cost.
        ci = torch.randint(len(train), (r["batch_size"],), generator=gen).tolist()
        si = torch.randint(nf - tf + 1, (r["batch_size"],), generator=gen).tolist()
        yx = torch.randint(size - crop + 1, (r["batch_size"], 2), generator=gen).tolist()
        x = torch.stack(
            [clip_window(train[c][0], s, tf)[..., y : y + crop, x_ : x_ + crop] for c, s, (y, x_) in zip(ci, si, yx)]
        )
        x = x.to(dev)
        # bf16 autocast on CUDA for the convolutional encode/decode (fp32 weights and optimiser);
        # the losses and the KL in fp32. Nothing on the CPU.
        with autocast(dev):
            post = vae.encode(x).latent_dist
        # "sample": the usual VAE objective, the decoder sees posterior samples. "mode": the
        # decoder sees the posterior mean (a KL-regularised autoencoder), as the teacher's
        # latents and every decode later do; at the toy's training length the sampling noise
        # (posterior std starts at 1 against means of ~3) cost 2.6 dB held-out PSNR at 100 steps.
        with autocast(dev):
            # (diffusers draws a CPU generator's noise on the CPU and moves it: the same draws on any device)
            z = post.sample(generator=gen) if r["posterior"] == "sample" else post.mode()
            rec = vae.decode(z).sample.float()
        mse = F.mse_loss(rec, x)
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = mse + F.l1_loss(rec, x) + r["kl_weight"] * kl
        psnr = float(psnr_db(mse.detach(), peak=2.0))  # signal range [-1, 1]
        return loss, {"loss": float(loss.detach()), "kl": float(kl.detach()), "psnr": psnr}

    curve = fit(d / "ckpt.pt", r, vae, opt, warmup_cosine(opt, r), gen, step_fn, "vae", exp.echo)
    vae.eval().requires_grad_(False)
    (d / "curve.json").write_text(json.dumps(curve))
    with torch.no_grad():
        # Latent statistics of the training windows become the VAE's latents_mean/std, the
        # normalisation WanPipeline and the trainer apply (the released values fit Wan's VAE).
        mu = encode_mode(vae, [clip_window(c, 0, f) for c, _ in train[: max(8, len(train) // 2)]])
        mean = mu.mean(dim=(0, 2, 3, 4))
        std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        vae.save_pretrained(d / "vae")
        raft = load_toy_raft(exp.raft_path, dev)

        psnrs, per_frame, epe_rec, mag, mag_rec, flows, flows_rec = [], [], [], [], [], [], []
        clips = [clip for clip, _ in held[: r["eval_clips"]]]
        z = normalize_latents(vae, encode_mode(vae, [clip_window(c, 0, f) for c in clips]))
        recs = torch.cat([decode_to_uint8(vae, z[i : i + 4]) for i in range(0, len(z), 4)]).numpy()
        for clip, rec in zip(clips, recs):
            orig = clip[:f]
            err = (rec.astype(np.float64) - orig.astype(np.float64)) ** 2
            psnrs.append(psnr_db(err.mean(), peak=255.0))  # uint8 frames
            per_frame.append(err.reshape(len(err), -1).mean(axis=1))
            fo, fr = clip_flow(raft, orig), clip_flow(raft, rec)
            epe_rec.append(float(torch.linalg.vector_norm(fo - fr, dim=1).mean()))
            mag.append(float(fo.norm(dim=1).mean()))
            mag_rec.append(float(fr.norm(dim=1).mean()))
            flows.append(fo)
            flows_rec.append(fr)
    return {
        "steps_done": curve[-1]["step"] if curve else 0,
        "heldout_psnr_db": round(float(np.mean(psnrs)), 3),
        # per frame over the clips' pooled error: a latent chunk the VAE decodes badly shows here
        "heldout_psnr_per_frame_db": [round(psnr_db(m, peak=255.0), 2) for m in np.mean(per_frame, axis=0)],
        "heldout_flow_epe_recon_vs_original": round(float(np.mean(epe_rec)), 4),
        "heldout_mean_flow_magnitude_original": round(float(np.mean(mag)), 4),
        "heldout_mean_flow_magnitude_recon": round(float(np.mean(mag_rec)), 4),
        # pair t = frames (t, t+1); latent chunk 0 is frame 0, chunk i frames 4i-3 .. 4i
        "heldout_flow_per_pair_original": flow_per_pair(flows),
        "heldout_flow_per_pair_recon": flow_per_pair(flows_rec),
        "latents_std_mean": round(float(std.mean()), 4),
    }
