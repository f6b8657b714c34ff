"""What a trained flow discriminator rewards: its logits on kinds of clips (issue 13's "show why").

    python -m experiments.toy_motion.probe_d --work W --run W/mogan/mogan [--step N] \\
        [--model dmd=W/dmd/run/export/transformer ...] [--dim 0.35] [--out DIR]

A stage-6 run's discriminator (the fp32 weights of one of its checkpoints, consolidated as
`python -m mogan_ds export` does) scores, through the run's own motion path (frozen VAE,
the toy RAFT, the run's window and flow scale, every window start):

* the held-out real clips by kind (static, object, pan, object+pan);
* the moving ones dimmed: intensity scaled toward black by `--dim` (contrast only, the
  motion is unchanged);
* the moving ones frozen: their first frame repeated (real appearance, zero motion);
* each `--model` generator's videos on stage 7's captions and seeds.

Per category: clips, mean logit, mean sigmoid(logit) (D's probability of "real"), the
window's mean RAFT flow (px/frame), mean intensity and contrast (per-frame spatial standard
deviation of the intensity), both in [0, 1]. Writes `probe_d.json` and
`probe_d.md` to `--out`. A probe, not a metric: it reads one D at one step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.toy_motion.measure import to_unit  # noqa: E402
from experiments.toy_motion.render import render_videos  # noqa: E402
from experiments.toy_motion.stages.evaluate import captions  # noqa: E402
from experiments.toy_motion.workdir import WorkFolder  # noqa: E402

KINDS = ("static", "object", "pan", "object+pan")


def dimmed(video: torch.Tensor, factor: float) -> torch.Tensor:
    """Frames in [-1, 1] with their intensity (in [0, 1]) scaled by `factor` toward black."""
    return ((video + 1) * factor) - 1


def load_discriminator(run: Path, step: int | None = None):
    """(the run's config, its MotionDiscriminator with the checkpoint's fp32 weights, the checkpoint path)."""
    from mogan_ds.checkpoint.consolidate import engine_fp32_state_dict, find_checkpoint, run_config
    from mogan_ds.models.builders import wan_paths
    from mogan_ds.motion.discriminator import build_discriminator

    cfg = run_config(run)
    ckpt = find_checkpoint(run, step)
    state = engine_fp32_state_dict(ckpt, "discriminator")
    # The prompt embedding is a buffer of the checkpoint: a zero one of its shape is overwritten.
    disc = build_discriminator(
        wan_paths(cfg.models.root)["transformer"], cfg.gan, torch.zeros_like(state["prompt_embeds"])
    )
    disc.load_state_dict(state, strict=True)
    return cfg, disc.eval().requires_grad_(False), ckpt


class Probe:
    """The run's D behind the run's motion path; `score` maps clips to per-clip readings."""

    def __init__(self, run: Path, step: int | None = None):
        from mogan_ds.models.builders import load_raft, load_vae, wan_paths
        from mogan_ds.motion.pipeline import MotionPath
        from mogan_ds.motion.window import Window

        self.cfg, self.disc, self.checkpoint = load_discriminator(run, step)
        if self.cfg.gan.space != "flow":
            raise ValueError(f"{run}: gan.space={self.cfg.gan.space}; the probe reads flow discriminators")
        vae = load_vae(wan_paths(self.cfg.models.root)["vae"], torch.float32).eval().requires_grad_(False)
        raft = load_raft(self.cfg.models.raft, self.cfg.models.raft_arch)
        self.path = MotionPath.from_config(self.cfg.gan, self.cfg.latent_frames, vae, raft, checkpoint=False)
        spec = self.path.window
        self.windows = [Window(s, spec.length) for s in spec.starts()]

    @torch.no_grad()
    def score(self, videos: list[torch.Tensor], batch: int = 4) -> list[dict]:
        """Videos [3, F, H, W] in [-1, 1] (F >= the clip length) -> per video: logit and sigmoid
        (means over the window starts), mean flow magnitude, mean intensity and contrast."""
        out = []
        for i in range(0, len(videos), batch):
            clip = torch.stack(videos[i : i + batch])[:, :, : self.cfg.video.num_frames]
            logits, flows = [], []
            for w in self.windows:
                s = self.path.real(clip, w)
                logits.append(self.disc(s.d_input))
                flows.append(s.flow.norm(dim=1).flatten(1).mean(1))
            logit, flow = torch.stack(logits).mean(0), torch.stack(flows).mean(0)
            prob = torch.sigmoid(torch.stack(logits)).mean(0)
            unit = ((clip + 1) / 2).mean(1)  # [B, F, H, W] intensity
            light, contrast = unit.flatten(1).mean(1), unit.flatten(2).std(2).mean(1)
            for j in range(len(clip)):
                out.append(
                    {
                        "logit": float(logit[j]),
                        "p_real": float(prob[j]),
                        "flow": float(flow[j]),
                        "intensity": float(light[j]),
                        "contrast": float(contrast[j]),
                    }
                )
        return out


def summary(recs: list[dict]) -> dict:
    return {"clips": len(recs), **{k: round(float(np.mean([r[k] for r in recs])), 4) for k in recs[0]}}


def probe(
    work: Path, run: Path, models: dict[str, Path], dim: float, step: int | None = None, scale: str = "full"
) -> dict:
    """{category: summary} for the work folder's held-out clips and the given generators
    (rendered on the `scale`'s stage-7 captions and seeds)."""
    wf = WorkFolder(work, scale)
    p = Probe(run, step)
    held = wf.clips("heldout")
    video = lambda frames: to_unit(frames).movedim(0, 1)  # noqa: E731  [F, H, W, 3] uint8 -> [3, F, H, W]
    cats: dict[str, list[dict]] = {}
    for kind in KINDS:
        clips = [video(c) for c, m in held if m["kind"] == kind]
        if clips:
            cats[f"real: {kind}"] = p.score(clips)
    moving = [video(c) for c, m in held if m["kind"] != "static"]
    if moving:
        cats[f"real, moving, dimmed x{dim:g}"] = p.score([dimmed(v, dim) for v in moving])
        cats["real, moving, frozen (frame 0 repeated)"] = p.score([v[:, :1].expand_as(v) for v in moving])
    r = wf.recipes["eval"]
    texts = captions(held, r)
    for name, path in models.items():
        videos = render_videos(wf, Path(path), False, texts, list(r["seeds"]), wf.trainer_config("dmd"))
        cats[f"generated: {name}"] = p.score([video(v) for v in videos])
    return {
        "run": str(run),
        "checkpoint": p.checkpoint.name,
        "windows": [w.start for w in p.windows],
        "categories": {k: summary(v) for k, v in cats.items()},
    }


def markdown(res: dict) -> str:
    lines = [
        f"D of `{res['run']}` at {res['checkpoint']}, window starts {res['windows']} (readings averaged over them)",
        "",
        "| clips | n | mean logit | D's P(real) | mean flow (px/frame) | intensity | contrast |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, s in res["categories"].items():
        lines.append(
            f"| {k} | {s['clips']} | {s['logit']:+.2f} | {s['p_real']:.2f} | {s['flow']:.2f} | {s['intensity']:.3f} | {s['contrast']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the experiment's work folder (held-out clips, models)")
    ap.add_argument("--run", required=True, help="a stage-6 trainer run with checkpoints (its D is probed)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=TRANSFORMER_DIR", help="a generator to score")
    ap.add_argument("--dim", type=float, default=0.35, help="intensity factor of the dimmed real clips")
    ap.add_argument("--scale", choices=("full", "smoke"), default="full", help="whose stage-7 captions and seeds")
    ap.add_argument("--out", default=None, help="folder for probe_d.json / probe_d.md (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    models = {}
    for m in args.model:
        name, sep, path = m.partition("=")
        if not sep:
            ap.error(f"--model {m!r}: expected NAME=TRANSFORMER_DIR")
        models[name] = Path(path)
    res = probe(Path(args.work), Path(args.run), models, args.dim, args.step, args.scale)
    md = markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe_d.json").write_text(json.dumps(res, indent=1))
        (out / "probe_d.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
