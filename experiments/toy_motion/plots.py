"""PNG figures of the toy experiment drawn with PIL (the evaluator's own chart is PIL too; no matplotlib here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .measure import clip_flow

PALETTE = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193)]


def _panel(d: ImageDraw.ImageDraw, box, title: str, series: dict[str, list[tuple[float, float]]]) -> None:
    """One line chart in `box` (x0, y0, x1, y1): a series per name, each a list of (x, y)."""
    x0, y0, x1, y1 = box
    left, top, right, bottom = x0 + 48, y0 + 22, x1 - 8, y1 - 20
    d.text((x0 + 4, y0 + 4), title, fill="black")
    pts = [p for s in series.values() for p in s if np.isfinite(p[1])]
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    if not pts:
        d.text((left + 10, (top + bottom) // 2), "not logged", fill="gray")
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xa, xb = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ya, yb = min(ys), max(ys)
    if yb - ya < 1e-9:
        ya, yb = ya - 0.5, yb + 0.5
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        d.text((x0 + 2, y - 6), f"{ya + frac * (yb - ya):.3g}", fill="black")
    d.text((right - 40, bottom + 4), f"{xb:.0f}", fill="black")

    def xy(p):
        return left + (p[0] - xa) / (xb - xa) * (right - left), bottom - (p[1] - ya) / (yb - ya) * (bottom - top)

    for i, s in enumerate(series.values()):
        s = [p for p in s if np.isfinite(p[1])]
        color = PALETTE[i % len(PALETTE)]
        if len(s) > 1:
            d.line([xy(p) for p in s], fill=color, width=2)
        for p in s if len(s) <= 12 else []:
            x, y = xy(p)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)


def _legend(d, names, y=4, x=None):
    x = x or 10
    for i, n in enumerate(names):
        d.rectangle([x, y, x + 10, y + 10], fill=PALETTE[i % len(PALETTE)])
        d.text((x + 14, y), n, fill="black")
        x += 20 + 7 * len(n)


def _grid(panels: list[tuple[str, dict]], out: Path, cols: int = 3, w: int = 360, h: int = 220) -> None:
    rows = (len(panels) + cols - 1) // cols
    img = Image.new("RGB", (cols * w, rows * h + 20), "white")
    d = ImageDraw.Draw(img)
    names: list[str] = []
    for _, series in panels:
        names += [n for n in series if n not in names]
    _legend(d, names)
    for k, (title, series) in enumerate(panels):
        r, c = divmod(k, cols)
        # the same colour per name in every panel
        ordered = {n: series.get(n, []) for n in names}
        _panel(d, (c * w, 20 + r * h, (c + 1) * w, 20 + (r + 1) * h), title, ordered)
    img.save(out)


def _smooth(points: list[tuple[float, float]], k: int) -> list[tuple[float, float]]:
    if k <= 1 or len(points) < k:
        return points
    ys = np.convolve([p[1] for p in points], np.ones(k) / k, mode="valid")
    return [(points[i + k - 1][0], float(y)) for i, y in enumerate(ys)]


def curves_png(runs: dict[str, Path], out: Path) -> None:
    """The trainer runs' curves: DMD and GAN losses, D accuracy, D(real) - D(fake), dynamics over steps."""
    from mogan_ds.train.metrics import read_metrics

    data = {name: read_metrics(run) if (run / "metrics.jsonl").is_file() else [] for name, run in runs.items()}

    def series(fn):
        out_ = {}
        for name, rows in data.items():
            pts = [(r["step"], fn(r)) for r in rows if fn(r) is not None]
            if pts:
                out_[name] = pts
        return out_

    def key(k):
        return lambda r: r.get(k)

    def gap(r):
        if "d_real_logit" in r and "d_fake_logit" in r:
            return r["d_real_logit"] - r["d_fake_logit"]
        return None

    panels = [
        ("DMD generator loss", series(key("dmd_loss"))),
        ("fake-score loss", series(key("fake_score_loss"))),
        ("generator GAN loss", series(key("g_gan_loss"))),
        ("D loss", series(key("d_loss"))),
        ("D accuracy", series(key("d_accuracy"))),
        ("D(real) - D(fake) logit", series(gap)),
        ("dynamics degree (EMA/fixed set)", series(key("eval_dynamics_degree"))),
    ]
    _grid(panels, out)


def pretraining_png(work: Path, out: Path) -> None:
    """Stages 2-4: RAFT's sequence loss and train EPE, the VAE's PSNR, the teacher's flow-matching loss."""

    def load(stage):
        p = work / stage / "curve.json"
        return json.loads(p.read_text()) if p.is_file() else []

    raft, vae, teacher = load("raft"), load("vae"), load("teacher")
    k = 25
    panels = [
        ("RAFT sequence loss", {"raft": _smooth([(c["step"], c["loss"]) for c in raft], k)}),
        ("RAFT train EPE (px)", {"raft": _smooth([(c["step"], c["epe"]) for c in raft], k)}),
        ("VAE train PSNR (dB)", {"vae": _smooth([(c["step"], c["psnr"]) for c in vae], k)}),
        ("teacher flow-matching loss", {"teacher": _smooth([(c["step"], c["loss"]) for c in teacher], k)}),
    ]
    _grid(panels, out, cols=2)


def sample_grid_png(videos: dict[str, np.ndarray], raft, caption: str, out: Path, frames=(0, 2, 4, 6, 8)) -> None:
    """One row per model: the frames, then their RAFT flow (colour wheel, one scale per clip)."""
    from mogan_ds.motion.flow import flow_to_rgb

    size, pad, label = 96, 4, 110
    ncol = 2 * len(frames) - 1
    img = Image.new("RGB", (label + ncol * (size + pad), 24 + len(videos) * (size + pad)), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), f"{caption}   (frames | RAFT flow of pairs t->t+1)", fill="black")
    for r, (name, video) in enumerate(videos.items()):
        y = 24 + r * (size + pad)
        d.text((4, y + size // 2 - 6), name[:16], fill="black")
        flow = clip_flow(raft, video)  # [F-1, 2, H, W]
        rgb = flow_to_rgb(flow.transpose(0, 1)[None])[0].permute(1, 2, 3, 0).numpy()  # [F-1, H, W, 3]
        tiles = [video[t] for t in frames] + [rgb[t] for t in frames[:-1]]
        for c, tile in enumerate(tiles):
            im = Image.fromarray(np.asarray(tile, dtype=np.uint8)).resize((size, size), Image.BILINEAR)
            img.paste(im, (label + c * (size + pad), y))
    img.save(out)
