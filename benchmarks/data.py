"""Loader throughput: real clips per second per loader worker.

    python benchmarks/data.py [--clips 12] [--step-seconds 13]

Writes shards of H.264 videos (moving shapes over a panning, grainy texture, so the
bitrate is that of real footage rather than of flat colours), then streams them through
`MotionClipStream` in-process (num_workers=0: exactly one worker's work: tar reading,
PyAV decode of the clip's frames, swscale resize + crop, batching; uint8 clips, as the
trainer takes them, converted to floats on the device) for

* the tiny recipe: 9 frames at 8 fps, 128x128, from 160x160 8 fps sources;
* the paper's shape: 49 frames at 16 fps, 480x832, from 480x832 sources at 16 fps
  (shards built with ``build_shards.py --transcode --fps 16 --short-side 480``) and at
  30 fps (originals kept: ~92 frames decoded per clip).

It times the 480p case once more as the trainer took it before (float32, converted on the
training process's CPU) beside the uint8 stream it takes now, then checks the target "one
node's workers deliver >= 10x the real clips a step consumes" with the arithmetic written
out. The last line is JSON. Figures are CPU measurements of this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from mogan_ds.data.corpus import MotionClipStream
from mogan_ds.data.shard_build import write_tar_atomic
from mogan_ds.data.video import encode_mp4


def textured_video(rng: np.random.Generator, frames: int, height: int, width: int) -> np.ndarray:
    """A camera pan over smooth texture, two moving boxes, and film grain (uint8 [F, H, W, 3])."""
    pan = rng.uniform(1.0, 3.0, size=2)
    big_h, big_w = height + int(pan[0] * frames) + 8, width + int(pan[1] * frames) + 8
    coarse = rng.integers(40, 215, size=(big_h // 16 + 2, big_w // 16 + 2, 3)).astype(np.float32)
    tex = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:big_h, :big_w]
    for _ in range(2):  # soften the blocks into smooth texture
        tex = 0.25 * (np.roll(tex, 4, 0) + np.roll(tex, -4, 0) + np.roll(tex, 4, 1) + np.roll(tex, -4, 1))
    out = np.empty((frames, height, width, 3), np.uint8)
    boxes = [
        (
            rng.uniform(0, height - 60),
            rng.uniform(0, width - 90),
            rng.uniform(-4, 4),
            rng.uniform(-6, 6),
            rng.integers(0, 255, 3),
        )
        for _ in range(2)
    ]
    for t in range(frames):
        oy, ox = int(pan[0] * t), int(pan[1] * t)
        img = tex[oy : oy + height, ox : ox + width].copy()
        for y, x, vy, vx, color in boxes:
            yy, xx = int(y + vy * t) % (height - 60), int(x + vx * t) % (width - 90)
            img[yy : yy + 60, xx : xx + 90] = color
        img += rng.normal(0, 6, size=(height, width, 1)).astype(np.float32)  # grain: realistic bitrates
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_corpus(out: str, n: int, frames: int, height: int, width: int, fps: float, seed: int) -> float:
    """n videos in 2 shards; returns the mean bitrate in Mbit/s."""
    rng = np.random.default_rng(seed)
    samples, total = [], 0
    for i in range(n):
        data = encode_mp4(
            textured_video(rng, frames, height, width), fps, crf=23, preset="veryfast", deterministic=False
        )
        total += len(data)
        meta = {"fps": fps, "num_frames": frames, "width": width, "height": height, "motion": 3.0}
        samples.append({"__key__": f"{i:06d}", "mp4": data, "json": json.dumps(meta).encode()})
    os.makedirs(out, exist_ok=True)
    half = (n + 1) // 2
    write_tar_atomic(os.path.join(out, "000000.tar"), samples[:half])
    write_tar_atomic(os.path.join(out, "000001.tar"), samples[half:])
    return total * 8 / (n * frames / fps) / 1e6


def clips_per_second(
    shards: str, clips: int, num_frames: int, fps: float, height: int, width: int, output_dtype=torch.uint8
) -> float:
    stream = MotionClipStream(
        shards,
        num_frames=num_frames,
        fps=fps,
        height=height,
        width=width,
        dp_rank=0,
        dp_size=1,
        seed=0,
        num_workers=0,
        batch_size=1,
        shuffle_buffer=4,
        epoch_samples=10**6,
        output_dtype=output_dtype,
    )
    it = iter(stream)
    next(it)  # warm-up: first shard open, codec init
    t0 = time.perf_counter()
    for _ in range(clips):
        batch = next(it)
    dt = time.perf_counter() - t0
    assert batch["video"].shape == (1, 3, num_frames, height, width)
    assert stream.stats()["skipped_corrupt"] == 0 and stream.stats()["skipped_short"] == 0
    return clips / dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=12, help="480p clips timed per case (the tiny case times 5x as many)")
    ap.add_argument(
        "--step-seconds", type=float, default=13.0, help="estimated MoGAN iteration time at 480p (see the arithmetic)"
    )
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--workers-per-rank", type=int, default=4, help="data.num_workers of the wan2.1 recipe")
    ap.add_argument(
        "--clips-per-rank-step", type=int, default=1, help="real clips each rank's D update consumes per iteration"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        write_corpus(f"{tmp}/tiny", 8, 24, 160, 160, 8, seed=0)
        rate_16 = write_corpus(f"{tmp}/p16", 4, 64, 480, 832, 16, seed=1)  # 4 s at 16 fps
        rate_30 = write_corpus(f"{tmp}/p30", 4, 120, 480, 832, 30, seed=2)  # 4 s at 30 fps
        print(
            f"wrote benchmark shards in {time.time() - t0:.1f} s (480p bitrates: {rate_16:.1f} Mbit/s at 16 fps, {rate_30:.1f} Mbit/s at 30 fps)"
        )
        tiny = clips_per_second(f"{tmp}/tiny", 5 * args.clips, 9, 8, 128, 128)
        print(f"tiny (9 x 128x128 @ 8 fps, 160x160 source): {tiny:.1f} clips/s per loader worker")
        p16 = clips_per_second(f"{tmp}/p16", args.clips, 49, 16, 480, 832)
        print(f"480p (49 x 480x832 @ 16 fps, 16 fps source, 49 frames decoded): {p16:.2f} clips/s per loader worker")
        p30 = clips_per_second(f"{tmp}/p30", args.clips, 49, 16, 480, 832)
        print(f"480p (49 x 480x832 @ 16 fps, 30 fps source, ~92 frames decoded): {p30:.2f} clips/s per loader worker")
        # Before: the stream handed the trainer float32 clips, converted on the training process's CPU.
        # Now: uint8 clips cross the loader and the trainer converts them on the device (MoGANStep).
        p16_f32 = clips_per_second(f"{tmp}/p16", args.clips, 49, 16, 480, 832, torch.float32)
        mb = 3 * 49 * 480 * 832 / 1e6
        print(
            f"480p, 16 fps source, the stream as the trainer used it before (float32 on the CPU): {p16_f32:.2f} "
            f"clips/s; as it uses it now (uint8, converted on the device): {p16:.2f} clips/s "
            f"({p16 / p16_f32:.2f}x); {mb:.0f} MB instead of {4 * mb:.0f} MB per clip to the device"
        )

    worst = min(p16, p30)
    workers = args.gpus_per_node * args.workers_per_rank
    consumed = args.gpus_per_node * args.clips_per_rank_step  # sp=1: every GPU is a data-parallel rank
    need = 10 * consumed / args.step_seconds
    have = workers * worst
    # the step time below which the 10x margin would be lost
    t_min = 10 * consumed / have
    print(
        "10x check at the paper's shape (one node):\n"
        f"  consumption: {args.gpus_per_node} ranks x {args.clips_per_rank_step} real clip per iteration = {consumed} clips per iteration;\n"
        f"  an iteration is ~{args.step_seconds:g} s: ~40 forward-equivalents of the 1.3B DiT on 20,280 tokens\n"
        "  (13 x 30 x 52) = 40 x 1.3e14 FLOP = 5e15 FLOP per GPU at ~400 TFLOP/s bf16;\n"
        f"  need 10 x {consumed} / {args.step_seconds:g} s = {need:.2f} clips/s per node;\n"
        f"  have {workers} workers ({args.workers_per_rank} per rank) x {worst:.2f} clips/s (the slower 480p case, one core each) = {have:.1f} clips/s per node\n"
        f"  -> the workers deliver {have * args.step_seconds / consumed:.0f}x what an iteration consumes (target >= 10x: {'met' if have >= need else 'NOT met'});\n"
        f"  the margin stays >= 10x for any iteration longer than {t_min:.2f} s"
    )
    result = {
        "clips_per_s_tiny_per_worker": round(tiny, 3),
        "clips_per_s_480p_16fps_source_per_worker": round(p16, 3),
        "clips_per_s_480p_30fps_source_per_worker": round(p30, 3),
        "clips_per_s_480p_per_worker": round(worst, 3),
        "clips_per_s_480p_16fps_source_float32_before": round(p16_f32, 3),
        "loader_speedup_uint8_vs_float32": round(p16 / p16_f32, 3),
        "node_clips_per_s": round(have, 2),
        "node_clips_per_s_needed_10x": round(need, 3),
        "margin_x": round(have * args.step_seconds / consumed, 1),
        "min_step_seconds_for_10x": round(t_min, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
