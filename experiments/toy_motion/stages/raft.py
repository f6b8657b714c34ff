"""Stage 2: the toy RAFT, trained on the corpus's exact flow; frozen, it is the experiment's
flow instrument (a copy goes to the results folder)."""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

import torch

from ..measure import flow_pairs, heldout_epe, static_pairs, static_uniform_flow, to_unit, true_flow
from ..training import fit, seed_all

if TYPE_CHECKING:
    from ..workdir import WorkFolder


def run(exp: WorkFolder, r: dict) -> dict:
    from mogan_ds.models.builders import build_raft

    d = exp.dir("raft")
    gen = seed_all(r["seed"])
    train = exp.clips("train")
    held = exp.clips("heldout")
    dev = exp.device
    raft = build_raft("raft_small").float().train().to(dev)  # fp32 throughout, no autocast
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
        a, b, gt = a.to(dev), b.to(dev), gt.to(dev)
        preds = raft(a, b, num_flow_updates=r["train_iters"])
        n = len(preds)
        # RAFT's sequence loss: L1 on every refinement, later ones weighted more.
        loss = sum(r["gamma"] ** (n - i - 1) * (p - gt).abs().mean() for i, p in enumerate(preds))
        epe = float(torch.linalg.vector_norm(preds[-1].detach() - gt, dim=1).mean())
        return loss, {"loss": loss.item(), "epe": epe}

    curve = fit(d / "ckpt.pt", r, raft, opt, sched, gen, step_fn, "raft", exp.echo)
    raft.eval()
    torch.save({k: v.cpu() for k, v in raft.state_dict().items()}, exp.raft_path)
    # The frozen RAFT is the experiment's flow instrument: a copy beside the results, so that
    # tests can check it (it beats zero flow on held-out clips) without training it again.
    exp.results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(exp.raft_path, exp.results / "raft_small.pth")
    (d / "curve.json").write_text(json.dumps(curve))
    a, b, gt = flow_pairs(held, r["eval_pairs"])
    rep = heldout_epe(raft, a, b, gt, r["eval_iters"])
    return {
        **rep,
        "steps_done": curve[-1]["step"] if curve else 0,
        "static_uniform_flow": static_uniform_flow(raft, held[0][0].shape[1]),
    }
