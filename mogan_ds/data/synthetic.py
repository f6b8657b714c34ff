"""A synthetic motion corpus of moving shapes with known motion, as webdataset mp4 shards.

Every clip is rendered with known motion: one or two anti-aliased shapes moving at a
chosen speed and direction (px/frame in the frame), over a flat or textured background
that may pan (camera motion); about one clip in six is fully static. Each sample is
``NNNNNN.mp4`` + ``NNNNNN.json`` in the layout the shard builder writes (source, fps,
num_frames, width, height, caption, motion score) plus the ground truth: ``speed``
(object speed in the frame), ``pan`` (background velocity), ``kind`` and ``objects`` (each
shape's geometry and velocity, from which `exact_flow` rebuilds the per-pixel flow). Keys are global,
so samples stay unique across shards. The same seed gives the same corpus
(``data_tools/make_synthetic.py`` is the command line).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .motion_score import motion_score
from .records import completed_record
from .shard_build import write_tar_atomic
from .video import encode_mp4

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"gray": (110, 110, 110), "black": (15, 15, 15), "teal": (30, 110, 120)}
DIRECTIONS = ["right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right"]
KINDS = ["static", "object", "object", "pan", "object+pan", "object+pan"]  # 1 in 6 static
# The world `render_clip` draws unless told otherwise (the demo's and the tests' corpus).
# `textured`: every background carries a plane-wave texture (static when the camera is still)
# and every shape a two-wave shading pattern moving with it, so that motion is visible inside
# shapes and on the background, not only at shape edges (what a flow model needs to learn from).
DEFAULT_WORLD = {
    "speed": (0.75, 6.0),  # object speed range, px/frame
    "pan_speed": (1.0, 4.0),  # camera pan speed range, px/frame
    "radius": (0.08, 0.16),  # shape radius range, fraction of the shorter side
    "textured": False,
    "texture_freq": (0.25, 0.7),  # textured worlds: wave numbers (rad/px) of the textures
    "speed_words": (1.5, 3.5),  # object speeds (px/frame) where captions switch slowly -> steadily -> quickly
}


def _direction_word(vx: float, vy: float) -> str:
    angle = math.degrees(math.atan2(vy, vx)) % 360  # image y points down
    return DIRECTIONS[int((angle + 22.5) // 45) % 8]


def _speed_word(speed: float, bounds: tuple[float, float] = (1.5, 3.5)) -> str:
    return "slowly" if speed < bounds[0] else "steadily" if speed < bounds[1] else "quickly"


def _world(world: dict | None) -> dict:
    unknown = set(world or {}) - set(DEFAULT_WORLD)
    if unknown:
        raise ValueError(f"unknown synthetic world options {sorted(unknown)}; known: {sorted(DEFAULT_WORLD)}")
    return {**DEFAULT_WORLD, **(world or {})}


def _shading(rng: np.random.Generator, freq: tuple[float, float]) -> tuple:
    """A shape's texture: two plane waves at right angles (wave numbers in `freq`), in its own frame."""
    return (
        float(rng.uniform(*freq)),
        float(rng.uniform(*freq)),
        float(rng.uniform(0, math.pi)),
        *rng.uniform(0, 6.3, 2),
    )


def render_clip(
    rng: np.random.Generator, frames: int, height: int, width: int, world: dict | None = None
) -> tuple[np.ndarray, dict]:
    """One clip uint8 [F, H, W, 3] and its ground truth (speeds in px/frame).

    `world`: options over `DEFAULT_WORLD` (speed ranges, shape size, textures); with the
    defaults the random draws, and so the clips, are the same as without the argument.
    """
    w_ = _world(world)
    kind = KINDS[rng.integers(len(KINDS))]
    moving = "object" in kind
    panning = "pan" in kind
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    bg = np.array(BACKGROUNDS[bg_name], np.float32)
    speed = float(rng.uniform(*w_["speed"])) if moving else 0.0
    theta = float(rng.uniform(0, 2 * math.pi))
    vx, vy = speed * math.cos(theta), speed * math.sin(theta)
    pan_speed = float(rng.uniform(*w_["pan_speed"])) if panning else 0.0
    phi = float(rng.uniform(0, 2 * math.pi))
    px, py = pan_speed * math.cos(phi), pan_speed * math.sin(phi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # A background texture (plane waves) is drawn when the camera pans, so that the pan
    # is visible; it is evaluated at shifted coordinates, so sub-pixel pans are exact.
    # A textured world draws it on every background (at its texture_freq), static ones included.
    wave_k = w_["texture_freq"] if w_["textured"] else (0.05, 0.25)
    waves = (
        [(rng.uniform(*wave_k), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)) for _ in range(3)]
        if panning or w_["textured"]
        else []
    )
    n_obj = 1 + int(rng.random() < 0.4)
    objs = []
    for _ in range(n_obj):
        color_name = list(COLORS)[rng.integers(len(COLORS))]
        shape = "circle" if rng.random() < 0.5 else "square"
        r = float(rng.uniform(*w_["radius"]) * min(height, width))
        # start so the trajectory stays mostly in frame: centred path plus jitter
        cx = width / 2 - vx * (frames - 1) / 2 + rng.uniform(-0.15, 0.15) * width
        cy = height / 2 - vy * (frames - 1) / 2 + rng.uniform(-0.15, 0.15) * height
        # objects fixed in the world move with the background when the camera pans
        ovx, ovy = (vx, vy) if moving else (px, py)
        shade = _shading(rng, w_["texture_freq"]) if w_["textured"] else None
        objs.append((color_name, shape, r, cx, cy, ovx, ovy, shade))
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        img = np.broadcast_to(bg, (height, width, 3)).copy()
        if waves:
            tex = sum(
                np.cos(k * ((xx - px * t) * math.cos(a) + (yy - py * t) * math.sin(a)) + ph) for k, a, ph in waves
            ) / len(waves)
            img += 60.0 * tex[..., None]
        for color_name, shape, r, cx, cy, ovx, ovy, shade in objs:
            dx, dy = xx - (cx + ovx * t), yy - (cy + ovy * t)
            dist = np.sqrt(dx * dx + dy * dy) if shape == "circle" else np.maximum(np.abs(dx), np.abs(dy))
            alpha = np.clip(r - dist + 0.5, 0.0, 1.0)[..., None]  # one-pixel anti-aliased edge
            color = np.array(COLORS[color_name], np.float32)
            if shade is not None:  # the pattern is a function of (dx, dy): it moves with the shape
                k1, k2, a, p1, p2 = shade
                u, v = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
                color = color * (0.7 + 0.15 * (np.cos(k1 * u + p1) + np.cos(k2 * v + p2)))[..., None]
            img = img * (1 - alpha) + alpha * color
        video[t] = np.clip(img, 0, 255).astype(np.uint8)
    main = objs[0]
    obj_speed = math.hypot(main[5], main[6])
    if kind == "static":
        caption = f"a {main[0]} {main[1]} resting on a {bg_name} background, static camera"
    elif moving:
        how = f"{_direction_word(vx, vy)} {_speed_word(speed, w_['speed_words'])}"
        caption = f"a {main[0]} {main[1]} moving {how} on a {bg_name} background"
    else:
        caption = f"a {main[0]} {main[1]} on a {bg_name} patterned background"
    if panning:
        caption += f", the camera pans {_direction_word(-px, -py)}"  # a pan moves the scene the other way
    truth = {"kind": kind, "speed": round(obj_speed, 4), "pan": [round(px, 4), round(py, 4)], "caption": caption}
    # Every shape's geometry and velocity (drawing order, last on top): enough to rebuild the
    # exact per-pixel flow of any frame pair (`exact_flow`).
    truth["objects"] = [
        {"shape": shape, "r": r, "cx": cx, "cy": cy, "vx": ovx, "vy": ovy} for _, shape, r, cx, cy, ovx, ovy, _ in objs
    ]
    return video, truth


def exact_flow(truth: dict, frame: int, height: int, width: int) -> np.ndarray:
    """The true optical flow [2, H, W] (x, y in px) from `frame` to `frame + 1` of a clip rendered by `render_clip`.

    A pixel belongs to the topmost shape that covers at least half of it (the anti-aliased
    edge's alpha >= 0.5) and moves with that shape; every other pixel moves with the
    background (its pan velocity, zero when the camera is still).
    """
    flow = np.empty((2, height, width), np.float32)
    flow[0], flow[1] = truth["pan"]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for o in truth.get("objects", []):
        dx, dy = xx - (o["cx"] + o["vx"] * frame), yy - (o["cy"] + o["vy"] * frame)
        dist = np.sqrt(dx * dx + dy * dy) if o["shape"] == "circle" else np.maximum(np.abs(dx), np.abs(dy))
        inside = o["r"] - dist + 0.5 >= 0.5
        flow[0][inside], flow[1][inside] = o["vx"], o["vy"]
    return flow


def write_synthetic_corpus(
    out: str,
    num_clips: int = 32,
    frames: int = 24,
    size: tuple[int, int] = (160, 160),
    fps: float = 8.0,
    shards: int = 4,
    seed: int = 0,
    crf: int = 18,
    prompts: str = "",
    overwrite: bool = False,
    echo=print,
    world: dict | None = None,
) -> dict:
    """Write `num_clips` clips of `frames` frames at `size` (H, W) into `shards` tar shards under `out`.

    Clips are dealt out to shards in contiguous runs. `prompts`: also write the captions,
    one per line, to this file. `world`: `render_clip`'s options (None: the default world).
    A corpus already complete with the same arguments is
    left as it is (the demo calls this at every start) unless `overwrite`. Returns the
    summary that ``synthetic.json`` records.
    """
    h, w = (int(v) for v in size)
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise ValueError(f"size must be even and >= 16 on both sides, got {h}x{w}")
    if num_clips < 1 or shards < 1 or shards > num_clips or frames < 2:
        raise ValueError("need num_clips >= shards >= 1 and frames >= 2")
    record = {
        "crf": crf,
        "fps": fps,
        "frames": frames,
        "num_clips": num_clips,
        "out": out,
        "prompts": prompts,
        "seed": seed,
        "shards": shards,
        "size": [h, w],
    }
    if world is not None:  # recorded only when given, so corpora of the default world stay complete
        record["world"] = {k: list(v) if isinstance(v, tuple) else v for k, v in _world(world).items()}
    os.makedirs(out, exist_ok=True)
    done = os.path.join(out, "synthetic.json")
    summary = completed_record(done, "args", record, overwrite)
    if summary is not None:
        echo(f"synthetic corpus already complete in {out} ({summary['num_clips']} clips); overwrite to rewrite")
        return summary
    t0 = time.time()
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, num_clips, shards + 1).round().astype(int)
    captions, kinds = [], {}
    for s in range(shards):
        samples = []
        for idx in range(bounds[s], bounds[s + 1]):
            video, truth = render_clip(rng, frames, h, w, world)
            data = encode_mp4(video, fps, crf=crf, preset="veryfast")
            meta = {
                "source": f"synthetic:{seed}:{idx}",
                "fps": fps,
                "num_frames": frames,
                "width": w,
                "height": h,
                "duration": frames / fps,
                "motion": round(motion_score(data, fps), 4),
                "motion_method": "framediff",
                **truth,
            }
            samples.append({"__key__": f"{idx:06d}", "mp4": data, "json": json.dumps(meta).encode()})
            captions.append(truth["caption"])
            kinds[truth["kind"]] = kinds.get(truth["kind"], 0) + 1
        write_tar_atomic(os.path.join(out, f"{s:06d}.tar"), samples)
    if prompts:
        os.makedirs(os.path.dirname(os.path.abspath(prompts)), exist_ok=True)
        with open(prompts, "w") as fh:
            fh.write("\n".join(captions) + "\n")
    summary = {
        "num_clips": num_clips,
        "shards": shards,
        "kinds": kinds,
        "seconds": round(time.time() - t0, 2),
        "args": record,
    }
    with open(done, "w") as fh:
        json.dump(summary, fh, indent=1)
    echo(f"wrote {num_clips} clips in {shards} shards to {out} in {summary['seconds']} s ({kinds})")
    return summary
