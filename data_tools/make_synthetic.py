"""Write a synthetic motion corpus of moving shapes as webdataset mp4 shards.

    python data_tools/make_synthetic.py --out .cache/mogan_tiny/shards --num-clips 32 \
        --frames 24 --size 160x160 --fps 8 --shards 4 --prompts .cache/mogan_tiny/prompts.txt

Every clip is rendered with known motion: one or two anti-aliased shapes moving at a
chosen speed and direction (px/frame in the frame), over a flat or textured background
that may pan (camera motion); about one clip in six is fully static. Each sample is
``NNNNNN.mp4`` + ``NNNNNN.json`` in the layout data_tools/build_shards.py writes (source,
fps, num_frames, width, height, caption, motion score) plus the ground truth: ``speed``
(object speed in the frame), ``pan`` (background velocity) and ``kind``. Keys are global,
so samples stay unique across shards. The same seed gives the same corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from mogan_ds.data.shards import write_tar_atomic
from mogan_ds.data.video import encode_mp4, motion_score

COLORS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 80, 230), "yellow": (235, 210, 40), "white": (240, 240, 240), "purple": (150, 60, 200)}
BACKGROUNDS = {"gray": (110, 110, 110), "black": (15, 15, 15), "teal": (30, 110, 120)}
DIRECTIONS = ["right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right"]
KINDS = ["static", "object", "object", "pan", "object+pan", "object+pan"]  # 1 in 6 static


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 160x160, got {text!r}") from None
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"size must be even and >= 16 on both sides, got {text!r}")
    return h, w


def _direction_word(vx: float, vy: float) -> str:
    angle = math.degrees(math.atan2(vy, vx)) % 360  # image y points down
    return DIRECTIONS[int((angle + 22.5) // 45) % 8]


def _speed_word(speed: float) -> str:
    return "slowly" if speed < 1.5 else "steadily" if speed < 3.5 else "quickly"


def render_clip(rng: np.random.Generator, frames: int, height: int, width: int) -> tuple[np.ndarray, dict]:
    """One clip uint8 [F, H, W, 3] and its ground truth (speeds in px/frame)."""
    kind = KINDS[rng.integers(len(KINDS))]
    moving = "object" in kind
    panning = "pan" in kind
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    bg = np.array(BACKGROUNDS[bg_name], np.float32)
    speed = float(rng.uniform(0.75, 6.0)) if moving else 0.0
    theta = float(rng.uniform(0, 2 * math.pi))
    vx, vy = speed * math.cos(theta), speed * math.sin(theta)
    pan_speed = float(rng.uniform(1.0, 4.0)) if panning else 0.0
    phi = float(rng.uniform(0, 2 * math.pi))
    px, py = pan_speed * math.cos(phi), pan_speed * math.sin(phi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # A background texture (plane waves) is drawn when the camera pans, so that the pan
    # is visible; it is evaluated at shifted coordinates, so sub-pixel pans are exact.
    waves = [(rng.uniform(0.05, 0.25), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)) for _ in range(3)] if panning else []
    n_obj = 1 + int(rng.random() < 0.4)
    objs = []
    for _ in range(n_obj):
        color_name = list(COLORS)[rng.integers(len(COLORS))]
        shape = "circle" if rng.random() < 0.5 else "square"
        r = float(rng.uniform(0.08, 0.16) * min(height, width))
        # start so the trajectory stays mostly in frame: centred path plus jitter
        cx = width / 2 - vx * (frames - 1) / 2 + rng.uniform(-0.15, 0.15) * width
        cy = height / 2 - vy * (frames - 1) / 2 + rng.uniform(-0.15, 0.15) * height
        # objects fixed in the world move with the background when the camera pans
        ovx, ovy = (vx, vy) if moving else (px, py)
        objs.append((color_name, shape, r, cx, cy, ovx, ovy))
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        img = np.broadcast_to(bg, (height, width, 3)).copy()
        if waves:
            tex = sum(np.cos(k * ((xx - px * t) * math.cos(a) + (yy - py * t) * math.sin(a)) + ph) for k, a, ph in waves) / len(waves)
            img += 60.0 * tex[..., None]
        for color_name, shape, r, cx, cy, ovx, ovy in objs:
            dx, dy = xx - (cx + ovx * t), yy - (cy + ovy * t)
            dist = np.sqrt(dx * dx + dy * dy) if shape == "circle" else np.maximum(np.abs(dx), np.abs(dy))
            alpha = np.clip(r - dist + 0.5, 0.0, 1.0)[..., None]  # one-pixel anti-aliased edge
            img = img * (1 - alpha) + alpha * np.array(COLORS[color_name], np.float32)
        video[t] = np.clip(img, 0, 255).astype(np.uint8)
    main = objs[0]
    obj_speed = math.hypot(main[5], main[6])
    if kind == "static":
        caption = f"a {main[0]} {main[1]} resting on a {bg_name} background, static camera"
    elif moving:
        caption = f"a {main[0]} {main[1]} moving {_direction_word(vx, vy)} {_speed_word(speed)} on a {bg_name} background"
    else:
        caption = f"a {main[0]} {main[1]} on a {bg_name} patterned background"
    if panning:
        caption += f", the camera pans {_direction_word(-px, -py)}"  # a pan moves the scene the other way
    truth = {"kind": kind, "speed": round(obj_speed, 4), "pan": [round(px, 4), round(py, 4)], "caption": caption}
    return video, truth


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder for NNNNNN.tar shards")
    ap.add_argument("--num-clips", type=int, default=32, help="clips in total")
    ap.add_argument("--frames", type=int, default=24, help="frames per clip")
    ap.add_argument("--size", type=parse_size, default=(160, 160), help="HxW of the clips")
    ap.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4")
    ap.add_argument("--shards", type=int, default=4, help="number of shards (clips are dealt out in contiguous runs)")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--crf", type=int, default=18, help="x264 quality (0: lossless luma)")
    ap.add_argument("--prompts", default="", help="also write the captions, one per line, to this file")
    ap.add_argument("--overwrite", action="store_true", help="rewrite an existing corpus")
    args = ap.parse_args(argv)
    if args.num_clips < 1 or args.shards < 1 or args.shards > args.num_clips or args.frames < 2:
        ap.error("need --num-clips >= --shards >= 1 and --frames >= 2")
    h, w = args.size
    os.makedirs(args.out, exist_ok=True)
    done = os.path.join(args.out, "synthetic.json")
    if os.path.exists(done) and not args.overwrite:
        with open(done) as fh:
            summary = json.load(fh)
        if summary.get("args") == _args_record(args):
            print(f"synthetic corpus already complete in {args.out} ({summary['num_clips']} clips); --overwrite to rewrite")
            return summary
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    bounds = np.linspace(0, args.num_clips, args.shards + 1).round().astype(int)
    captions, kinds = [], {}
    for s in range(args.shards):
        samples = []
        for idx in range(bounds[s], bounds[s + 1]):
            video, truth = render_clip(rng, args.frames, h, w)
            data = encode_mp4(video, args.fps, crf=args.crf, preset="veryfast")
            meta = {
                "source": f"synthetic:{args.seed}:{idx}",
                "fps": args.fps,
                "num_frames": args.frames,
                "width": w,
                "height": h,
                "duration": args.frames / args.fps,
                "motion": round(motion_score(data, args.fps), 4),
                "motion_method": "framediff",
                **truth,
            }
            samples.append({"__key__": f"{idx:06d}", "mp4": data, "json": json.dumps(meta).encode()})
            captions.append(truth["caption"])
            kinds[truth["kind"]] = kinds.get(truth["kind"], 0) + 1
        write_tar_atomic(os.path.join(args.out, f"{s:06d}.tar"), samples)
    if args.prompts:
        os.makedirs(os.path.dirname(os.path.abspath(args.prompts)), exist_ok=True)
        with open(args.prompts, "w") as fh:
            fh.write("\n".join(captions) + "\n")
    summary = {"num_clips": args.num_clips, "shards": args.shards, "kinds": kinds, "seconds": round(time.time() - t0, 2), "args": _args_record(args)}
    with open(done, "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"wrote {args.num_clips} clips in {args.shards} shards to {args.out} in {summary['seconds']} s ({kinds})")
    return summary


def _args_record(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items()) if k != "overwrite"}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
