"""The toy-world experiment, stage by stage: data, RAFT, VAE, teacher, DMD, MoGAN (+ ablations), evaluation.

Each stage reads its recipe (``stageN_*.yaml`` next to this file; at the smoke size
``smoke.yaml`` overrides some keys), works in ``<work>/<stage>/`` and ends by writing
``done.json`` with a key: the hash of its recipe and of every upstream stage's key. A stage
whose ``done.json`` holds the current key is skipped, so a changed recipe re-runs that stage
and everything after it. Inside a stage, training loops checkpoint every
``checkpoint_every`` steps and continue from there when restarted; the trainer stages
resume through ``launch/train.py --resume``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from mogan_ds.data.synthetic import write_synthetic_corpus
from mogan_ds.data.video import read_mp4

from .measure import (
    ToyMetrics,
    clip_flow,
    flow_pairs,
    flow_per_pair,
    frame_bank,
    heldout_epe,
    load_toy_raft,
    paired_difference,
    psnr_db,
    results_row,
    static_pairs,
    static_uniform_flow,
    to_unit,
    true_flow,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DS_CPU = REPO / "ds_configs" / "zero3_cpu.json"
STAGES = ("data", "raft", "vae", "teacher", "dmd", "mogan", "eval")
RECIPES = {
    "data": "stage1_data.yaml",
    "raft": "stage2_raft.yaml",
    "vae": "stage3_vae.yaml",
    "teacher": "stage4_teacher.yaml",
    "dmd": "stage5_dmd.yaml",
    "mogan": "stage6_mogan.yaml",
    "eval": "stage7_eval.yaml",
}
HELDOUT_SEED_OFFSET = 1000


# --------------------------------------------------------------------------- recipes and caching


def load_recipe(stage: str, scale: str = "full") -> dict:
    """A stage's recipe; at the smoke size with smoke.yaml's keys for it applied.

    For the trainer stages the smoke keys are `key=value` overrides, kept under
    ``overrides``; for the others they replace the recipe's top-level keys.
    """
    recipe = yaml.safe_load((HERE / RECIPES[stage]).read_text())
    if stage == "mogan":  # the rows live beside the trainer recipe, which the trainer reads as it is
        recipe["rows"] = yaml.safe_load((HERE / "stage6_rows.yaml").read_text())
    if scale == "smoke":
        smoke = yaml.safe_load((HERE / "smoke.yaml").read_text())
        extra = smoke.get(stage)
        if isinstance(extra, list):
            recipe["overrides"] = list(extra)
        elif extra:
            recipe.update(extra)
        if stage == "mogan" and "mogan_rows" in smoke:
            recipe["rows"] = {k: v for k, v in recipe["rows"].items() if k in smoke["mogan_rows"]}
    elif scale != "full":
        raise ValueError(f"scale must be full or smoke, got {scale!r}")
    return recipe


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seed_all(seed: int) -> torch.Generator:
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _warmup_cosine(opt: torch.optim.Optimizer, r: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over r["warmup_steps"], then a cosine from r["lr"] down to r["lr_floor"] x lr at the last step."""
    warm, steps, floor = max(1, r["warmup_steps"]), r["steps"], r["lr_floor"]

    def factor(i: int) -> float:
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, i / max(1, steps))))
        return min((i + 1) / warm, floor + (1.0 - floor) * cos)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    ckpt: Path,
    r: dict,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    step_fn,
    label: str,
    echo=print,
) -> list[dict]:
    """The training loop of stages 2-4: steps up to r["steps"], resumable.

    `step_fn(step)` draws its batch from `gen` and returns (loss, {name: float}) for the curve;
    the update is AdamW-style: zero grad, backward, clip to r["grad_clip"], step, schedule step.
    Every r["checkpoint_every"] steps (and at the last) the model, optimiser, schedule, curve and
    generator state go to `ckpt` atomically; a restart continues from there, drawing the same batches.
    Returns the curve, one {"step", **values} per step.
    """
    start, curve = 0, []
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start, curve = st["step"], st["curve"]
        gen.set_state(st["rng"])
    for step in range(start, r["steps"]):
        loss, values = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        sched.step()
        curve.append({"step": step + 1, **values})
        if (step + 1) % r["checkpoint_every"] == 0 or step + 1 == r["steps"]:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            _atomic_save({**state, "step": step + 1, "curve": curve, "rng": gen.get_state()}, ckpt)
            recent = {k: np.mean([c[k] for c in curve[-50:]]) for k in values}
            echo(
                f"[toy] {label} step {step + 1}/{r['steps']} (mean of last 50): "
                + ", ".join(f"{k} {v:.4f}" for k, v in recent.items())
            )
    return curve


# --------------------------------------------------------------------------- data access


def encode_mode(vae, xs: list[torch.Tensor], batch: int = 8) -> torch.Tensor:
    """Posterior means of clips [3, F, H, W] in [-1, 1] -> [N, 16, T, h, w], encoded `batch` at a time.

    Batched encoding equals one clip at a time (convolutions and per-frame attention work per
    sample; measured max difference 1e-6) and is ~2.5x faster on the CPU.
    """
    return torch.cat([vae.encode(torch.stack(xs[i : i + batch])).latent_dist.mode() for i in range(0, len(xs), batch)])


def load_clips(folder: Path) -> list[tuple[np.ndarray, dict]]:
    """Every clip of a shard folder, in key order: (uint8 [F, H, W, 3], its metadata with the ground truth)."""
    out = []
    for tar in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key in sorted(members):
            frames, _ = read_mp4(members[key]["mp4"])
            out.append((frames, json.loads(members[key]["json"])))
    return out


# --------------------------------------------------------------------------- the experiment


class Experiment:
    """The seven stages over one work folder; `run()` does what is not done yet."""

    def __init__(self, work: str | Path, scale: str = "full", results: str | Path | None = None, echo=print):
        self.work = Path(work).resolve()
        self.scale = scale
        self.results = Path(results).resolve() if results else self.work / "results"
        self.echo = echo
        self.recipes = {s: load_recipe(s, scale) for s in STAGES}
        self.keys: dict[str, str] = {}
        upstream: list = []
        for s in STAGES:
            upstream = [*upstream, self.recipes[s]]
            self.keys[s] = _key(s, upstream)

    def clip_frames(self) -> int:
        """Frames of the clips the trainer sees (video.num_frames): the VAE's and teacher's evaluation windows."""
        return int(self.recipes["dmd"]["video"]["num_frames"])

    def dir(self, stage: str) -> Path:
        d = self.work / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, stage: str) -> dict | None:
        p = self.work / stage / "done.json"
        if p.is_file():
            rec = json.loads(p.read_text())
            if rec.get("key") == self.keys[stage]:
                return rec
        return None

    def report(self, stage: str) -> dict:
        rec = self.done(stage)
        if rec is None:
            raise RuntimeError(f"stage {stage} has not finished in {self.work}")
        return rec["report"]

    def run(self, stages: list[str] | None = None) -> dict:
        wanted = stages or list(STAGES)
        for s in STAGES:
            if s not in wanted:
                continue
            if self.done(s):
                self.echo(f"[toy] {s}: done (cached in {self.work / s})")
                continue
            # A re-run of a stage whose recipe changed starts clean, not from stale checkpoints.
            stale = self.work / s / "key"
            if stale.is_file() and stale.read_text() != self.keys[s]:
                shutil.rmtree(self.work / s)
            self.dir(s)
            (self.work / s / "key").write_text(self.keys[s])
            self.echo(f"[toy] {s}: running")
            t0 = time.time()
            report = getattr(self, f"stage_{s}")(self.recipes[s])
            report["seconds"] = round(time.time() - t0, 1)
            rec = {"key": self.keys[s], "report": report}
            (self.work / s / "done.json").write_text(json.dumps(rec, indent=1))
            self.echo(f"[toy] {s}: {json.dumps(report)}")
        return {s: (self.done(s) or {}).get("report") for s in STAGES}

    # What a finished stage keeps only to resume, not needed downstream: the training checkpoint
    # (model, optimiser, RNG) and the teacher's encoded training windows (24 MB at full size); the
    # key file, which reusing writes anew.
    TRAINING_STATE = ("ckpt.pt", "latents.pt", "key")
    # Folders a stage writes beside its own: the teacher writes the WanPipeline release (models/)
    # every later stage loads. A saved stage holds them under `beside/`.
    BESIDE = {"teacher": ("models",)}

    def save_stage(self, stage: str, dest: str | Path) -> Path:
        """Copy a finished stage's folder (and the folders it writes beside it) to `dest` without its
        training state, e.g. to keep a long stage's models (stage 3's VAE: 60-90 minutes here) for
        a later work folder."""
        if self.done(stage) is None:
            raise RuntimeError(f"stage {stage} has not finished in {self.work} under the current recipes")
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"{dest} exists; saving a stage does not overwrite")
        shutil.copytree(self.work / stage, dest, ignore=shutil.ignore_patterns(*self.TRAINING_STATE))
        for name in self.BESIDE.get(stage, ()):
            shutil.copytree(self.work / name, dest / "beside" / name)
        return dest

    def reuse_stage(self, stage: str, src: str | Path) -> None:
        """Take a stage saved by `save_stage` (or another work folder's) as this folder's finished
        stage. Its key must be this experiment's: the same recipes for it and every stage before it.
        Training a stage again on the same recipes does not give bit-identical models (threaded CPU
        kernels), so reusing is how a later run changes only the stages it means to."""
        src = Path(src)
        done = src / "done.json"
        if not done.is_file():
            raise FileNotFoundError(f"{src} holds no finished stage (no done.json)")
        key = json.loads(done.read_text()).get("key")
        if key != self.keys[stage]:
            raise ValueError(
                f"{src} was made by other recipes than this experiment's for stages "
                f"{', '.join(STAGES[: STAGES.index(stage) + 1])} (key {key}, expected {self.keys[stage]})"
            )
        if self.done(stage):
            return
        beside = [src / "beside" / name for name in self.BESIDE.get(stage, ())]
        missing = [str(b) for b in beside if not b.is_dir()]
        if missing:
            raise FileNotFoundError(f"{src} lacks what stage {stage} writes beside its folder: {', '.join(missing)}")
        for d in [stage, *(b.name for b in beside)]:
            if (self.work / d).exists():
                shutil.rmtree(self.work / d)
        shutil.copytree(src, self.work / stage, ignore=shutil.ignore_patterns("beside"))
        for b in beside:
            shutil.copytree(b, self.work / b.name)
        (self.work / stage / "key").write_text(self.keys[stage])

    # ------------------------------------------------------------------ 1: data

    def stage_data(self, r: dict) -> dict:
        from mogan_ds.data.prompts import encode_prompt_folder
        from mogan_ds.models.tiny import write_tiny_models

        d = self.dir("data")
        tiny = write_tiny_models(d / "tiny", seed=r["text_seed"])
        size = (r["size"], r["size"])
        for split, n, shards, seed in (
            ("train", r["train_clips"], r["shards"], r["seed"]),
            ("heldout", r["heldout_clips"], 1, r["seed"] + HELDOUT_SEED_OFFSET),
        ):
            write_synthetic_corpus(
                str(d / split),
                num_clips=n,
                frames=r["frames"],
                size=size,
                fps=r["fps"],
                shards=shards,
                seed=seed,
                prompts=str(d / f"{split}.txt"),
                echo=self.echo,
                world=r.get("world"),
            )
        captions = (d / "train.txt").read_text().splitlines()
        encode_prompt_folder(
            captions,
            str(tiny / "wan" / "text_encoder"),
            str(tiny / "wan" / "tokenizer"),
            str(d / "prompts"),
            max_length=r["max_length"],
            echo=self.echo,
        )
        metas = [m for _, m in load_clips(d / "heldout")] + [m for _, m in load_clips(d / "train")]
        words = {w: sum(w in m["caption"] for m in metas) for w in ("slowly", "steadily", "quickly", "static")}
        flows = [true_flow(m, 0).norm(dim=0) for m in metas]
        return {
            "train_clips": r["train_clips"],
            "heldout_clips": r["heldout_clips"],
            "caption_speed_words": words,
            "object_speed_px_per_frame": [min(m["speed"] for m in metas), max(m["speed"] for m in metas)],
            "world": r.get("world") or "default",
            "mean_true_flow_magnitude": round(float(np.mean([float(f.mean()) for f in flows])), 4),
            # Pixels moving by more than half a pixel (frame 0 -> 1): the share zero flow gets wrong.
            "moving_pixel_fraction": round(float(np.mean([float((f > 0.5).float().mean()) for f in flows])), 4),
        }

    # ------------------------------------------------------------------ 2: RAFT

    def stage_raft(self, r: dict) -> dict:
        from mogan_ds.models.builders import build_raft

        d = self.dir("raft")
        gen = _seed_all(r["seed"])
        train = load_clips(self.work / "data" / "train")
        held = load_clips(self.work / "data" / "heldout")
        raft = build_raft("raft_small").float().train()
        opt = torch.optim.AdamW(raft.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        warm = max(1, int(r["warmup_fraction"] * r["steps"]))
        # RAFT's one-cycle shape: linear warm-up, then linear decay to zero at the last step.
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min((i + 1) / warm, max(0.0, (r["steps"] - i) / max(1, r["steps"] - warm)))
        )
        nf = train[0][0].shape[0]

        # Whole frames, no crops: torchvision's RAFT needs >= 128 px (its correlation pyramid).
        def step_fn(step: int):
            ci = torch.randint(len(train), (r["batch_size"],), generator=gen).tolist()
            ti = torch.randint(nf - 1, (r["batch_size"],), generator=gen).tolist()
            a = torch.stack([to_unit(train[c][0][t]) for c, t in zip(ci, ti)])
            b = torch.stack([to_unit(train[c][0][t + 1]) for c, t in zip(ci, ti)])
            gt = torch.stack([true_flow(train[c][1], t) for c, t in zip(ci, ti)])
            # Some pairs are flat or smooth static scenes at zero flow (measure.static_pairs).
            flat = torch.rand(r["batch_size"], generator=gen) < r["static_fraction"]
            if flat.any():
                sa, sb, sg = static_pairs(int(flat.sum()), a.shape[-1], a, gen, r["static_gain"])
                a, b, gt = a.clone(), b.clone(), gt.clone()
                a[flat], b[flat], gt[flat] = sa, sb, sg
            # Random horizontal flips double the directions seen (flow's x flips with the image).
            if torch.rand((), generator=gen) < 0.5:
                a, b, gt = a.flip(-1), b.flip(-1), gt.flip(-1) * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
            preds = raft(a, b, num_flow_updates=r["train_iters"])
            n = len(preds)
            # RAFT's sequence loss: L1 on every refinement, later ones weighted more.
            loss = sum(r["gamma"] ** (n - i - 1) * (p - gt).abs().mean() for i, p in enumerate(preds))
            epe = float(torch.linalg.vector_norm(preds[-1].detach() - gt, dim=1).mean())
            return loss, {"loss": loss.item(), "epe": epe}

        curve = fit(d / "ckpt.pt", r, raft, opt, sched, gen, step_fn, "raft", self.echo)
        raft.eval()
        torch.save(raft.state_dict(), d / "raft_small.pth")
        # The frozen RAFT is the experiment's flow instrument: a copy beside the results, so that
        # tests can check it (it beats zero flow on held-out clips) without training it again.
        self.results.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(d / "raft_small.pth", self.results / "raft_small.pth")
        (d / "curve.json").write_text(json.dumps(curve))
        a, b, gt = flow_pairs(held, r["eval_pairs"])
        rep = heldout_epe(raft, a, b, gt, r["eval_iters"])
        return {**rep, "static_uniform_flow": static_uniform_flow(raft, held[0][0].shape[1])}

    # ------------------------------------------------------------------ 3: VAE

    def stage_vae(self, r: dict) -> dict:
        from diffusers import AutoencoderKLWan

        from mogan_ds.sampling.samplers import decode_to_uint8, normalize_latents

        d = self.dir("vae")
        gen = _seed_all(r["seed"])
        train = load_clips(self.work / "data" / "train")
        held = load_clips(self.work / "data" / "heldout")
        vae = AutoencoderKLWan(**r["arch"]).float().train()
        opt = torch.optim.AdamW(vae.parameters(), lr=r["lr"], weight_decay=0.0)
        nf, f, tf, crop = train[0][0].shape[0], self.clip_frames(), r["train_frames"], r["crop"]
        if tf < f:
            # Wan's VAE is causal over latent chunks: a chunk past the training window decodes out of
            # distribution (the third run's VAE lost ~7 dB there), and the trainer decodes every chunk.
            raise ValueError(f"vae.train_frames={tf} is shorter than the trainer's clip (video.num_frames={f})")
        size = train[0][0].shape[1]

        def window(clip: np.ndarray, s: int, n: int = f) -> torch.Tensor:
            return to_unit(clip[s : s + n]).transpose(0, 1)  # [3, F, H, W]

        def step_fn(step: int):
            # Random crops of short windows: the VAE is convolutional (its mid-block attention
            # is per frame), so crops train the same weights at a fraction of the cost.
            ci = torch.randint(len(train), (r["batch_size"],), generator=gen).tolist()
            si = torch.randint(nf - tf + 1, (r["batch_size"],), generator=gen).tolist()
            yx = torch.randint(size - crop + 1, (r["batch_size"], 2), generator=gen).tolist()
            x = torch.stack(
                [window(train[c][0], s, tf)[..., y : y + crop, x_ : x_ + crop] for c, s, (y, x_) in zip(ci, si, yx)]
            )
            post = vae.encode(x).latent_dist
            # "sample": the usual VAE objective, the decoder sees posterior samples. "mode": the
            # decoder sees the posterior mean (a KL-regularised autoencoder), as the teacher's
            # latents and every decode later do; at the toy's training length the sampling noise
            # (posterior std starts at 1 against means of ~3) cost 2.6 dB held-out PSNR at 100 steps.
            z = post.sample(generator=gen) if r["posterior"] == "sample" else post.mode()
            rec = vae.decode(z).sample
            mse = F.mse_loss(rec, x)
            kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
            loss = mse + F.l1_loss(rec, x) + r["kl_weight"] * kl
            psnr = float(psnr_db(mse.detach(), peak=2.0))  # signal range [-1, 1]
            return loss, {"loss": float(loss.detach()), "kl": float(kl.detach()), "psnr": psnr}

        curve = fit(d / "ckpt.pt", r, vae, opt, _warmup_cosine(opt, r), gen, step_fn, "vae", self.echo)
        vae.eval().requires_grad_(False)
        (d / "curve.json").write_text(json.dumps(curve))
        with torch.no_grad():
            # Latent statistics of the training windows become the VAE's latents_mean/std, the
            # normalisation WanPipeline and the trainer apply (the released values fit Wan's VAE).
            mu = encode_mode(vae, [window(c, 0) for c, _ in train[: max(8, len(train) // 2)]])
            mean = mu.mean(dim=(0, 2, 3, 4))
            std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
            vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
            vae.save_pretrained(d / "vae")
            raft = load_toy_raft(self.work / "raft" / "raft_small.pth")

            psnrs, per_frame, epe_rec, mag, mag_rec, flows, flows_rec = [], [], [], [], [], [], []
            clips = [clip for clip, _ in held[: r["eval_clips"]]]
            z = normalize_latents(vae, encode_mode(vae, [window(c, 0) for c in clips]))
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

    # ------------------------------------------------------------------ 4: teacher

    def _text(self):
        from mogan_ds.models.builders import load_text_encoder, load_tokenizer

        tiny = self.work / "data" / "tiny" / "wan"
        return load_tokenizer(str(tiny / "tokenizer")), load_text_encoder(str(tiny / "text_encoder"), torch.float32)

    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption embeddings and the negative prompt's, as the trainer's prompt folder holds them."""
        from mogan_ds.config import TextConfig
        from mogan_ds.sampling.samplers import encode_prompts

        tok, enc = self._text()
        length = self.recipes["data"]["max_length"]
        embeds = encode_prompts(texts, tok, enc, length)
        negative = encode_prompts([TextConfig().negative_prompt], tok, enc, length)
        return embeds, negative

    def stage_teacher(self, r: dict) -> dict:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

        from mogan_ds.losses.flow_matching import flow_matching_loss
        from mogan_ds.sampling.samplers import normalize_latents, transformer_velocity_fn
        from mogan_ds.sampling.schedule import FlowMatchSchedule

        d = self.dir("teacher")
        gen = _seed_all(r["seed"])
        train = load_clips(self.work / "data" / "train")
        vae = AutoencoderKLWan.from_pretrained(self.work / "vae" / "vae").float().eval().requires_grad_(False)
        f = self.clip_frames()
        lat_path = d / "latents.pt"
        if lat_path.is_file():
            lat = torch.load(lat_path, weights_only=True)
        else:
            xs, idx = [], []
            for i, (clip, _) in enumerate(train):
                for s in r["window_starts"]:
                    xs.append(to_unit(clip[s : s + f]).transpose(0, 1))
                    idx.append(i)
            with torch.no_grad():
                lat = {"x0": normalize_latents(vae, encode_mode(vae, xs)), "clip": torch.tensor(idx)}
            _atomic_save(lat, lat_path)
        embeds, negative = self._embed([m["caption"] for _, m in train])
        arch = dict(r["arch"], patch_size=tuple(r["arch"]["patch_size"]))
        model = WanTransformer3DModel(**arch).float().train()
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
        fn = transformer_velocity_fn(model)
        n = len(lat["x0"])

        def step_fn(step: int):
            i = torch.randint(n, (r["batch_size"],), generator=gen)
            x0 = lat["x0"][i]
            cond = embeds[lat["clip"][i]].clone()
            drop = torch.rand(len(i), generator=gen) < r["cfg_dropout"]
            cond[drop] = negative[0]
            eps = torch.randn(x0.shape, generator=gen)
            sigma = FlowMatchSchedule.shift_sigma(torch.rand(len(i), generator=gen), r["shift"])
            x_t = FlowMatchSchedule.add_noise(x0, eps, sigma)
            loss, _ = flow_matching_loss(fn(x_t, sigma * 1000.0, cond), x0, eps)
            return loss, {"loss": loss.item()}

        curve = fit(d / "ckpt.pt", r, model, opt, _warmup_cosine(opt, r), gen, step_fn, "teacher", self.echo)
        model.eval().requires_grad_(False)
        (d / "curve.json").write_text(json.dumps(curve))
        # The release every later stage loads: WanPipeline layout with the trained teacher and
        # VAE and the tiny UMT5; the generator starts as the teacher (the DMD warm-up start).
        tok, enc = self._text()
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=r["shift"]
        )
        models = self.work / "models"
        WanPipeline(tokenizer=tok, text_encoder=enc, vae=vae, scheduler=scheduler, transformer=model).save_pretrained(
            models / "wan"
        )
        model.save_pretrained(models / "generator")
        # Does the teacher move like the data? Its CFG samples on held-out captions.
        held = load_clips(self.work / "data" / "heldout")[: r["report_prompts"]]
        texts = [m["caption"] for _, m in held]
        metrics = ToyMetrics(load_toy_raft(self.work / "raft" / "raft_small.pth"), self.recipes["data"]["fps"])
        cfg = self.trainer_config("dmd")
        videos = self.render(models / "wan" / "transformer", True, texts, [0], cfg)
        recs = [metrics.video(v) for v in videos]
        data = [metrics.video(c[:f]) for c, _ in held]
        return {
            "final_loss_last50": round(float(np.mean([c["loss"] for c in curve[-50:]])), 4),
            "samples": len(recs),
            "teacher_mean_flow_magnitude": round(float(np.mean([x["mean_flow_magnitude"] for x in recs])), 4),
            "data_mean_flow_magnitude": round(float(np.mean([x["mean_flow_magnitude"] for x in data])), 4),
            "teacher_dynamic_fraction": round(float(np.mean([x["dynamic"] for x in recs])), 4),
            "data_dynamic_fraction": round(float(np.mean([x["dynamic"] for x in data])), 4),
        }

    # ------------------------------------------------------------------ sampling (stages 4 and 7)

    def trainer_config(self, stage: str, extra: list[str] = ()):
        from mogan_ds.config import load_config

        return load_config(str(HERE / RECIPES[stage]), [*self.paths_overrides(), *extra])

    def paths_overrides(self) -> list[str]:
        m = self.work / "models"
        return [
            f"models.root={m / 'wan'}",
            f"models.generator={m / 'generator'}",
            f"models.raft={self.work / 'raft' / 'raft_small.pth'}",
            f"data.shards={self.work / 'data' / 'train'}",
            f"data.prompts={self.work / 'data' / 'prompts'}",
        ]

    @torch.no_grad()
    def render(self, transformer_dir: Path, teacher: bool, texts: list[str], seeds: list[int], cfg) -> list[np.ndarray]:
        """Videos [len(seeds) x len(texts)] (seed-major) exactly as the evaluator renders them:
        noise from generate.sample_seed(seed, prompt index), few-step or CFG sampler, the VAE's decode."""
        from mogan_ds.models.builders import load_transformer, load_vae
        from mogan_ds.motion.latents import latent_shape
        from mogan_ds.sampling.generate import sample_seed
        from mogan_ds.sampling.samplers import decode_to_uint8, sample_few_step, sample_teacher_cfg
        from mogan_ds.sampling.samplers import transformer_velocity_fn as vfn
        from mogan_ds.sampling.schedule import FlowMatchSchedule, randn

        schedule = FlowMatchSchedule.from_config(cfg)
        model = load_transformer(str(transformer_dir), torch.float32).eval().requires_grad_(False)
        vae = load_vae(str(self.work / "models" / "wan" / "vae"), torch.float32).eval()
        fn = vfn(model)
        embeds, negative = self._embed(texts)
        out = []
        for seed in seeds:
            for i in range(len(texts)):
                g = torch.Generator("cpu").manual_seed(sample_seed(seed, i))
                noise = randn(latent_shape(cfg.video, 1), [g], "cpu")
                if teacher:
                    lat = sample_teacher_cfg(fn, noise, embeds[i : i + 1], negative, schedule)
                else:
                    lat = sample_few_step(fn, noise, embeds[i : i + 1], schedule, generator=[g])
                out.append(decode_to_uint8(vae, lat)[0].numpy())
        return out

    # ------------------------------------------------------------------ 5, 6: the trainer

    def _train(self, stage: str, run: Path, extra: list[str]) -> Path:
        """One trainer run through launch/train.py (world of one), resumed when it has checkpoints."""
        from mogan_ds.cli.launcher import launch_env

        r = self.recipes[stage]
        args = [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--ds_config",
            str(DS_CPU),
            "--config",
            str(HERE / RECIPES[stage]),
            *self.paths_overrides(),
            f"output.run_dir={run}",
            *extra,
            *r.get("overrides", []),
        ]
        if any((run / "checkpoints").glob("step_*/COMPLETE")):
            args.append("--resume")
        self.echo("+ " + " ".join(args))
        # DeepSpeed JIT-builds its CPU comm op at start-up under a file lock in the extensions
        # folder; in a folder of this checkout's own, other virtualenvs sharing ~/.cache cannot
        # make the launch wait on (or redo) their builds. Built once, then reused.
        ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")
        env = launch_env({"OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1)), "TORCH_EXTENSIONS_DIR": ext})
        with open(run.parent / f"{run.name}.console.log", "a") as log:
            proc = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(
                f"trainer run {run} failed (exit {proc.returncode}); see {run.parent / run.name}.console.log"
            )
        export = run / "export" / "transformer"
        if not (export / "config.json").is_file():
            raise RuntimeError(f"trainer run {run} left no export at {export}")
        return export

    def _run_summary(self, run: Path) -> dict:
        from mogan_ds.train.metrics import read_metrics

        rows = read_metrics(run)
        last = rows[-1]
        keep = ("dmd_loss", "fake_score_loss", "g_gan_loss", "d_loss", "d_accuracy", "eval_dynamics_degree")
        return {"steps": last["step"], **{k: round(float(last[k]), 4) for k in keep if k in last}}

    def stage_dmd(self, r: dict) -> dict:
        run = self.dir("dmd") / "run"
        self._train("dmd", run, [])
        return self._run_summary(run)

    def stage_mogan(self, r: dict) -> dict:
        gen = self.work / "dmd" / "run" / "export" / "transformer"
        report = {}
        for name, extra in r["rows"].items():
            run = self.dir("mogan") / name
            if not (run / "export" / "transformer" / "config.json").is_file():
                self._train("mogan", run, [f"models.generator={gen}", *extra])
            report[name] = self._run_summary(run)
        return report

    # ------------------------------------------------------------------ 7: evaluation

    def model_list(self) -> list[tuple[str, Path, bool]]:
        models = [
            ("teacher", self.work / "models" / "wan" / "transformer", True),
            ("dmd", self.work / "dmd" / "run" / "export" / "transformer", False),
        ]
        for name in self.recipes["mogan"]["rows"]:
            models.append((name, self.work / "mogan" / name / "export" / "transformer", False))
        return models

    def stage_eval(self, r: dict) -> dict:
        return self.evaluate(r, self.work / "raft" / "raft_small.pth", self.dir("eval"))

    def remeasure(self, raft_path: str | Path) -> dict:
        """Stage 7 on this work folder's trained models with another flow instrument (a toy RAFT
        state dict, e.g. a later run's stage 2): the GAN trained with this folder's RAFT, the
        measurements use `raft_path`. Per-video caches go to `<work>/eval_with_<sha>/`; the results
        folder gets the tables, plus the instrument's path, hash and readings on static uniform
        clips (stages.json, "flow_instrument")."""
        # The models are measured as they were trained: the folder's finished stages are taken
        # under the keys they recorded, even if a recipe has changed since (e.g. stage 2's, which is
        # the point of measuring them with another RAFT).
        for s in STAGES[:-1]:
            done = self.work / s / "done.json"
            if not done.is_file():
                raise RuntimeError(f"stage {s} has not finished in {self.work}: nothing to re-measure")
            self.keys[s] = json.loads(done.read_text())["key"]
        raft_path = Path(raft_path).resolve()
        sha = hashlib.sha256(raft_path.read_bytes()).hexdigest()
        size = self.recipes["data"]["size"]
        instrument = {
            "path": str(raft_path.relative_to(REPO)) if raft_path.is_relative_to(REPO) else str(raft_path),
            "sha256": sha,
            "static_uniform_flow": static_uniform_flow(load_toy_raft(raft_path), size),
        }
        return self.evaluate(self.recipes["eval"], raft_path, self.dir(f"eval_with_{sha[:12]}"), instrument)

    def evaluate(self, r: dict, raft_path: Path, d: Path, instrument: dict | None = None) -> dict:
        """Stage 7's work: every model rendered on the same captions and seeds, measured with the
        RAFT at `raft_path`, per-video records cached in `d`; tables, plots and grids to the results."""
        from mogan_ds.eval.report import bar_chart

        from .plots import curves_png, pretraining_png, sample_grid_png

        res = self.results
        res.mkdir(parents=True, exist_ok=True)
        fps = self.recipes["data"]["fps"]
        f = self.clip_frames()
        held = load_clips(self.work / "data" / "heldout")
        train = load_clips(self.work / "data" / "train")
        texts = [held[i % len(held)][1]["caption"] for i in range(r["prompts"])]
        raft = load_toy_raft(raft_path)
        bank = frame_bank([c[:f] for c, _ in train], r["nearest_size"])
        metrics = ToyMetrics(raft, fps, bank, r["nearest_size"])
        cfg = self.trainer_config("dmd")
        rows, grids, per_video = [], {}, {}
        # The data's own row: the real held-out clips through the same metrics (the target motion).
        real = [held[i % len(held)][0][:f] for i in range(r["prompts"])]
        data_recs = [metrics.video(v) for v in real]
        rows.append(results_row("data (held-out real)", data_recs, metrics.weights, r["bootstrap"]))
        # The instrument's calibration on the real row: what the renderer says the clips move.
        exact = [held[i % len(held)][1] for i in range(r["prompts"])]
        rows[-1]["mean_flow_magnitude_exact"] = float(
            np.mean([float(true_flow(m, t).norm(dim=0).mean()) for m in exact for t in range(f - 1)])
        )
        grids["data"] = real[: r["grid_prompts"]]
        for name, path, teacher in self.model_list():
            cache = d / f"{name}.json"
            if cache.is_file():
                recs = json.loads(cache.read_text())
                videos = self.render(path, teacher, texts[: r["grid_prompts"]], [r["seeds"][0]], cfg)
            else:
                videos = self.render(path, teacher, texts, list(r["seeds"]), cfg)
                recs = [metrics.video(v) for v in videos]
                cache.write_text(json.dumps(recs))
            rows.append(results_row(name, recs, metrics.weights, r["bootstrap"]))
            per_video[name] = recs
            grids[name] = videos[: r["grid_prompts"]]
        from mogan_ds.eval.report import results_markdown

        title = "Toy-world MoGAN experiment (experiments/toy_motion)"
        paired = paired_table(per_video, r["bootstrap"])
        (res / "results.json").write_text(json.dumps(rows, indent=1))
        (res / "paired.json").write_text(json.dumps(paired, indent=1))
        md = results_markdown(rows, title) + "\n" + extra_table(rows, r, self) + paired_markdown(paired)
        if instrument is not None:
            md += (
                "\nRe-measured: every row above was measured with the toy RAFT at "
                f"`{instrument['path']}` (sha256 {instrument['sha256'][:12]}), not the one the GAN trained "
                f"with; on static uniform clips it reads {instrument['static_uniform_flow']} px/frame. The "
                "VAE ceiling above is the training run's own stage-3 figure (its RAFT).\n"
            )
        (res / "results.md").write_text(md)
        bar_chart(rows, res / "results.png")
        curves_png(
            {"dmd": self.work / "dmd" / "run", **{n: self.work / "mogan" / n for n in self.recipes["mogan"]["rows"]}},
            res / "training_curves.png",
        )
        pretraining_png(self.work, res / "pretraining_curves.png")
        for p in range(r["grid_prompts"]):
            rows_v = {k: v[p] for k, v in grids.items()}
            sample_grid_png(rows_v, raft, texts[p], res / f"samples_prompt{p}.png")
        reports = {s: self.report(s) for s in STAGES[:-1]}
        if instrument is not None:
            reports["flow_instrument"] = instrument
        (res / "stages.json").write_text(json.dumps(reports, indent=1))
        return {
            row["model"]: {k: row[k] for k in ("dynamics_degree", "motion_smoothness", "mean_flow_magnitude")}
            for row in rows
        }


#: Baselines of the paired comparisons: the DMD generator trained on with DMD alone for the
#: stage-6 steps (when the recipe has that row) and the stage-5 DMD generator.
PAIRED_BASES = ("dmd_control", "dmd")
#: column -> (markdown header, display scale)
PAIRED_COLS = {
    "mean_flow_magnitude": ("Mean flow (px/frame)", 1),
    "motion_smoothness": ("Smoothness (pp)", 100),
    "psnr_nearest_real": ("PSNR to nearest real (dB)", 1),
}


def paired_table(per_video: dict[str, list[dict]], n_boot: int) -> dict:
    """Every generated model against each baseline on the same videos (same caption and noise):
    {base: {model: {col: paired_difference}}}. Pairing removes the between-prompt spread that
    dominates the per-model intervals."""
    out = {}
    for base in PAIRED_BASES:
        if base not in per_video:
            continue
        out[base] = {
            name: {c: paired_difference(recs, per_video[base], c, n_boot) for c in PAIRED_COLS}
            for name, recs in per_video.items()
            if name != base
        }
    return out


def paired_markdown(paired: dict) -> str:
    lines = [
        "## Paired differences (same caption and noise; 95% bootstrap interval of the mean; videos higher)",
        "",
    ]
    for base, models in paired.items():
        lines += [
            f"Against `{base}`:",
            "",
            "| Model | " + " | ".join(h for h, _ in PAIRED_COLS.values()) + " |",
            "|---" * (len(PAIRED_COLS) + 1) + "|",
        ]
        for name, cols in models.items():
            cells = []
            for c, (_, scale) in PAIRED_COLS.items():
                d = cols[c]
                lo, hi = (x * scale for x in d["ci95"])
                cells.append(f"{d['mean'] * scale:+.3f} [{lo:+.3f}, {hi:+.3f}] ({d['higher']}/{d['videos']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def extra_table(rows: list[dict], r: dict, exp: Experiment) -> str:
    """The toy's extra columns with 95% bootstrap intervals, and what every column means here."""

    def cell(row, col, scale=1.0, dec=3):
        v, ci = row.get(col), row.get(f"{col}_ci95")
        if v is None:
            return "n/a"
        s = f"{v * scale:.{dec}f}"
        return s + (f" [{ci[0] * scale:.{dec}f}, {ci[1] * scale:.{dec}f}]" if ci else "")

    real = next(row for row in rows if "mean_flow_magnitude_exact" in row)
    lines = [
        "## With 95% bootstrap intervals (videos resampled)",
        "",
        "| Model | Videos | Dynamics | Smoothness (%) | Mean flow (px/frame) | PSNR to nearest real (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['num_videos']} | {cell(row, 'dynamics_degree', 1, 2)} | "
            f"{cell(row, 'motion_smoothness', 100, 2)} | {cell(row, 'mean_flow_magnitude', 1, 3)} | "
            f"{cell(row, 'psnr_nearest_real', 1, 2)} |"
        )
    lines += [
        "",
        f"{r['prompts']} held-out captions x seeds {r['seeds']} per model, the same noise for every model "
        "(generate.sample_seed). Teacher: CFG sampler "
        f"({exp.recipes['dmd']['schedule']['teacher_steps']} steps, guidance "
        f"{exp.recipes['dmd']['schedule']['teacher_guidance_scale']}); the others: the 3-step sampler.",
        "Dynamics: VBench's rule (evaluator's DynamicDegree) on the frozen toy RAFT at 20 iterations. "
        "Smoothness: VBench's frame-interpolation rule (evaluator's MotionSmoothness) with a flow-based "
        "interpolator on the toy RAFT, since AMT-S has no weights here. Mean flow: mean RAFT flow magnitude "
        "over all pixels and frame pairs; the real clips' exact mean flow (`synthetic.exact_flow`) is "
        f"{real['mean_flow_magnitude_exact']:.3f} px/frame, which the instrument reads as "
        f"{real['mean_flow_magnitude']:.3f}. Appearance: per-frame PSNR at "
        f"{r['nearest_size']}x{r['nearest_size']} to the nearest real training frame (higher = closer to the "
        "data's look). Aesthetic / imaging quality have no weights in the toy world (n/a).",
        "",
    ]
    # What every generated row is bounded by and how long each was trained: a reader of the table
    # needs both to tell "MoGAN did not help" from "nothing could move more through this decoder".
    vae, dmd, mogan = exp.report("vae"), exp.report("dmd"), exp.report("mogan")
    rows6 = list(exp.recipes["mogan"]["rows"])  # the report also holds the stage's "seconds"
    steps = sorted({mogan[name]["steps"] for name in rows6})
    lines += [
        f"Ceiling of every decoded row: the stage-3 VAE's reconstructions of held-out clips have a mean RAFT "
        f"flow of {vae['heldout_mean_flow_magnitude_recon']:.3f} px/frame against "
        f"{vae['heldout_mean_flow_magnitude_original']:.3f} for the originals (flow EPE recon vs original "
        f"{vae['heldout_flow_epe_recon_vs_original']:.3f} px, PSNR {vae['heldout_psnr_db']:.2f} dB). "
        f"DMD row: {dmd['steps']} DMD steps from the teacher; the stage-6 rows ({', '.join(rows6)}): "
        f"{' / '.join(map(str, steps))} steps each from that DMD generator, the same seed.",
        "",
    ]
    return "\n".join(lines)
