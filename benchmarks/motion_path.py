"""Benchmark: chunked truncated-BPTT decoder vs plain autograd through a full Wan decode.

One generator GAN step of the motion path on the tiny recipe's models (CPU, fp32):

    latents --decode--> window frames --RAFT--> motion tensor --VAE encoder--> D --> softplus(-D)
        --> backward to the latents

for every window size w = 1..T (the window ends at the last chunk: start = T - w, so a
single-chunk window still has 4 frames to take flow between and the no-grad prefix is
exercised). Two decoders, everything else identical:

* chunked: `ChunkedWanDecoder.decode_window` (no-grad prefix, detached cache, per-chunk
  checkpointing, early stop);
* plain:   `plain_decode`, autograd through the stock chunk loop over the whole clip,
           then the window's frames are selected.

Memory, two measures, each (decoder, window) in a fresh subprocess after one warm-up step:

* peak (the headline): the largest number of live bytes allocated through torch's CPU
  allocator during one step, from torch.profiler's memory events (every allocation and
  free, signed, summed in order). Exact, deterministic and independent of machine load; it
  counts tensors and the op workspaces torch allocates (im2col buffers of CPU conv3d),
  i.e. what a GPU's caching allocator would have to hold, not Python objects.
* rss: the process's resident-set high-water mark (VmHWM after resetting it with
  ``5 > /proc/self/clear_refs`` and glibc malloc_trim) minus its RSS before the step. This
  is what `top` sees; glibc heap fragmentation inflates it by a run-dependent amount, so
  treat it as a cross-check (it is omitted where clear_refs is not writable).

Time is the wall-clock of warm, unprofiled steps (after one warm-up step; min over
--repeats), single-threaded by default. The machine may be shared: times are indicative;
the allocator peak is not affected by load.

The last line printed is one JSON object with max_abs_diff (window frames, chunked vs
plain, max over windows), grad_max_abs_diff (gradient on the window's latents, same),
peak_mem_ratio_window1 (allocator peak of chunked w=1 over plain w=1: the plain variant
always decodes the full clip with autograd, and at the same window everything downstream
is identical) and time_ratio (chunked over plain at w=T, where both decode the same
chunks), plus the per-window figures.

    python benchmarks/motion_path.py [--frames 29] [--size 128] [--repeats 1] [--threads 1] [--windows 1,2,8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def _reset_peak() -> bool:
    """Release freed heap and reset the peak-RSS counter; False where the kernel does not allow it."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _setup(args):
    """Models of the tiny recipe (written once under its models folder) and the step's inputs."""
    import torch

    from mogan_ds.config import load_config
    from mogan_ds.models import builders
    from mogan_ds.models.tiny import write_tiny_models
    from mogan_ds.motion.discriminator import build_discriminator
    from mogan_ds.motion.latents import num_latent_frames
    from mogan_ds.motion.pipeline import MotionPath

    torch.set_num_threads(args.threads)
    cfg = load_config(
        "tiny", [f"video.num_frames={args.frames}", f"video.height={args.size}", f"video.width={args.size}"]
    )
    models = Path(cfg.models.root).parent
    if not models.is_absolute():
        models = REPO / models
    write_tiny_models(models)
    paths = builders.wan_paths(models / "wan")
    vae = builders.load_vae(paths["vae"])
    raft = builders.load_raft(models / f"{cfg.models.raft_arch}.pth", cfg.models.raft_arch)
    path = MotionPath.from_config(cfg.gan, cfg.latent_frames, vae, raft)
    torch.manual_seed(0)
    text_dim = builders.read_transformer_config(paths["transformer"])["text_dim"]
    # A seeded stand-in for the UMT5 embedding of text.disc_prompt: the benchmark times the
    # motion path, and D's cost does not depend on the embedding's values.
    prompt = torch.randn(1, cfg.text.max_length, text_dim)
    disc = build_discriminator(
        paths["transformer"], cfg.gan, prompt, gradient_checkpointing=cfg.models.gradient_checkpointing
    )
    disc.requires_grad_(False)  # the generator's GAN step: gradient flows through D, D takes none
    num_latent = num_latent_frames(args.frames)
    latents = torch.randn(1, 16, num_latent, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(1))
    return path, disc, latents, num_latent


def worker(args) -> None:
    import torch

    from mogan_ds.losses.gan import g_logistic_loss
    from mogan_ds.motion.chunked_decode import plain_decode
    from mogan_ds.motion.latents import pixel_frame_range

    path, disc, latents, num_latent = _setup(args)
    window = args.window
    start = num_latent - window
    first, stop = pixel_frame_range(start, window)

    def step():
        z = latents.clone().requires_grad_(True)
        if args.worker == "chunked":
            frames = path.codec.decode_window(z, start, window)
        else:
            frames = plain_decode(path.codec.vae, z)[:, :, first:stop]
        _, motion = path.flow_and_motion(frames)
        loss, _ = g_logistic_loss(disc(path.encode_motion(motion)))
        loss.backward()
        return frames.detach(), z.grad[:, :, start:].clone()

    # The first step warms up (lazy imports, autograd threads, oneDNN primitives); the
    # reported time is the best warm step and the RSS peak is the last step's.
    times, rss_peak, frames, grad = [], None, None, None
    for _ in range(1 + max(1, args.repeats)):
        reset = _reset_peak()
        base = _status_bytes("VmRSS")
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        rss_peak = _status_bytes("VmHWM") - base if reset else None
        if frames is None:
            frames, grad = out
        del out
    torch.save({"frames": frames, "grad": grad}, args.dump)
    print(json.dumps({"peak_bytes": _allocator_peak(step), "rss_peak_bytes": rss_peak, "time_s": min(times[1:])}))


def _allocator_peak(step) -> int:
    """Peak of live bytes allocated through torch's CPU allocator during one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Every allocation and free is a "[memory]" event with a signed byte count; the peak is
    # the largest running sum (bytes alive before the step are not counted).
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _run_worker(args, kind: str, window: int, dump: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--window",
        str(window),
        "--dump",
        dump,
        "--frames",
        str(args.frames),
        "--size",
        str(args.size),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    # Passive OpenMP waits: with spinning (the default) a thread whose peer is descheduled
    # by other load burns its core, and a shared machine's timings blow up many-fold.
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if res.returncode:
        raise RuntimeError(f"{kind} w={window} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=29, help="pixel frames of the clip (4k+1; 29 = 8 latent chunks)")
    ap.add_argument("--size", type=int, default=128, help="frame height and width (RAFT needs >= 128)")
    ap.add_argument(
        "--repeats", type=int, default=1, help="timed warm steps per variant after the warm-up step (min is reported)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (1 keeps times stable on a shared machine)"
    )
    ap.add_argument("--windows", type=str, default="", help="comma-separated window sizes (default 1..T)")
    ap.add_argument("--worker", choices=["chunked", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=str, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from mogan_ds.motion.latents import num_latent_frames

    num_latent = num_latent_frames(args.frames)
    windows = [int(w) for w in args.windows.split(",")] if args.windows else list(range(1, num_latent + 1))
    print(
        f"motion path on the tiny recipe's models: {args.frames} frames ({num_latent} latent chunks) at "
        f"{args.size}x{args.size}, fp32, {args.threads} threads; window = the last w chunks; decode -> RAFT -> "
        "VAE encode -> D -> backward; one fresh process per cell"
    )
    print("peak = torch CPU-allocator peak during the step (MB); rss = resident-set high-water mark over baseline (MB)")
    head = (
        "w",
        "frames",
        "chunked",
        "plain",
        "ratio",
        "rss chk",
        "rss pln",
        "chunked s",
        "plain s",
        "t ratio",
        "|dx|",
        "|dgrad|",
    )
    widths = (3, 6, 8, 8, 6, 8, 8, 9, 8, 7, 8, 8)
    print(" ".join(f"{h:>{n}}" for h, n in zip(head, widths)))
    rows = {}
    mb = lambda b: float("nan") if b is None else b / 2**20  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for w in windows:
            res, dumps = {}, {}
            for kind in ("chunked", "plain"):
                dump = os.path.join(tmp, f"{kind}_{w}.pt")
                res[kind] = _run_worker(args, kind, w, dump)
                dumps[kind] = torch.load(dump)
            c, p = res["chunked"], res["plain"]
            rows[w] = dict(
                res,
                frames=dumps["chunked"]["frames"].shape[2],
                dx=(dumps["chunked"]["frames"] - dumps["plain"]["frames"]).abs().max().item(),
                dg=(dumps["chunked"]["grad"] - dumps["plain"]["grad"]).abs().max().item(),
                mem_ratio=c["peak_bytes"] / p["peak_bytes"],
                time_ratio=c["time_s"] / p["time_s"],
            )
            r = rows[w]
            cells = (
                w,
                r["frames"],
                f"{mb(c['peak_bytes']):.1f}",
                f"{mb(p['peak_bytes']):.1f}",
                f"{r['mem_ratio']:.3f}",
                f"{mb(c['rss_peak_bytes']):.1f}",
                f"{mb(p['rss_peak_bytes']):.1f}",
                f"{c['time_s']:.2f}",
                f"{p['time_s']:.2f}",
                f"{r['time_ratio']:.2f}",
                f"{r['dx']:.1e}",
                f"{r['dg']:.1e}",
            )
            print(" ".join(f"{x:>{n}}" for x, n in zip(cells, widths)), flush=True)
    full = max(rows)
    summary = {
        "num_latent": num_latent,
        "frames": args.frames,
        "size": args.size,
        "max_abs_diff": max(r["dx"] for r in rows.values()),
        "grad_max_abs_diff": max(r["dg"] for r in rows.values()),
        # Chunked w=1 over plain w=1: the plain variant decodes the full clip with autograd
        # whatever the window, and at w=1 everything downstream of the decoder is identical.
        "peak_mem_ratio_window1": rows[1]["mem_ratio"] if 1 in rows else None,
        "time_ratio": rows[full]["time_ratio"],
        "time_ratio_window": full,
        "peak_mem_ratio": {w: r["mem_ratio"] for w, r in rows.items()},
        "time_ratio_by_window": {w: r["time_ratio"] for w, r in rows.items()},
        "peak_mb": {k: {w: mb(r[k]["peak_bytes"]) for w, r in rows.items()} for k in ("chunked", "plain")},
        "rss_peak_mb": {k: {w: mb(r[k]["rss_peak_bytes"]) for w, r in rows.items()} for k in ("chunked", "plain")},
        "time_s": {k: {w: r[k]["time_s"] for w, r in rows.items()} for k in ("chunked", "plain")},
        "memory_method": "torch.profiler CPU-allocator peak per step, fresh process per variant, after a warm-up step",
        "threads": args.threads,
    }
    if summary["peak_mem_ratio_window1"] is not None:
        ok = summary["peak_mem_ratio_window1"] <= 0.35
        print(
            f"peak memory, chunked w=1 / plain (full-clip decode) w=1 = {summary['peak_mem_ratio_window1']:.3f} "
            f"(target <= 0.35 for >= 8 chunks: {'met' if ok else 'NOT met'}); time ratio at w={full}: {summary['time_ratio']:.2f}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
