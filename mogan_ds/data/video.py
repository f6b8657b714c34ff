"""Video I/O with PyAV: encode uint8 frames to mp4, decode a fixed-rate clip.

`torchvision.io.read_video` is gone in torchvision 0.29, so decoding goes through PyAV
directly. Frames are uint8 ``[F, H, W, 3]`` RGB numpy arrays on both sides; the loader
turns them into the float ``[3, F, H, W]`` layout of the model (`to_model_layout`).

Decoding a clip is "sample and hold" resampling to the requested fps: output frame k
shows the source frame nearest to time ``start + k / fps``, so a 30 fps source read at
16 fps skips frames and an 8 fps source read at 16 fps repeats them, exactly as
ffmpeg's ``fps`` filter does. Only the frames up to the clip's end are decoded and only
the chosen ones are converted (swscale does the resize in C, far cheaper than torch).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Iterator, Union

import av
import numpy as np

# A target time exactly halfway between two source frames takes the earlier one, so
# doubling the rate holds each frame twice (the tolerance absorbs float error).
_TIE = 1e-6

Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]


class VideoDecodeError(ValueError):
    """The input is not a decodable video (corrupt, truncated, no video stream)."""


class ClipTooShortError(VideoDecodeError):
    """The video decodes but does not cover the requested clip."""


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    num_frames: int  # counted from the container's metadata when present, else estimated
    duration: float  # seconds
    width: int
    height: int
    codec: str
    format: str  # container format, e.g. "mov,mp4,m4a,3gp,3g2,mj2"

    def frames_at(self, fps: float) -> int:
        """Frames a clip resampled to `fps` can have (the last one held half a source frame)."""
        end = (self.num_frames - 0.5) / self.fps if self.num_frames else self.duration
        return max(0, math.floor(end * fps + 1e-6) + 1) if end > 0 else 0


def _open(src: Source):
    """An input container; bytes are wrapped in BytesIO (no temporary files)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    try:
        container = av.open(src if not isinstance(src, os.PathLike) else os.fspath(src), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoDecodeError(f"cannot open video: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("no video stream in container")
    return container


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise VideoDecodeError("video stream has no frame rate")
    return float(rate)


def _stream_duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def probe_video(src: Source) -> VideoInfo:
    """Header-only metadata (no decoding)."""
    with _open(src) as container:
        vs = container.streams.video[0]
        fps = _stream_fps(vs)
        duration = _stream_duration(container, vs)
        frames = vs.frames or int(round(duration * fps))
        return VideoInfo(fps, frames, duration, vs.codec_context.width, vs.codec_context.height, vs.codec_context.name, container.format.name)


def resized_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """Size to scale to before a centre crop to (height, width): the smallest cover."""
    scale = max(height / src_h, width / src_w)
    return max(height, math.ceil(src_h * scale - 1e-6)), max(width, math.ceil(src_w * scale - 1e-6))


def _to_rgb(frame, height: int | None, width: int | None) -> np.ndarray:
    """Resize (cover) + centre crop in swscale/numpy; None keeps the source size."""
    if height is None or width is None:
        return frame.to_ndarray(format="rgb24")
    rh, rw = resized_size(frame.height, frame.width, height, width)
    img = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="AREA" if rh < frame.height else "BILINEAR").to_ndarray()
    top, left = (rh - height) // 2, (rw - width) // 2
    return img[top : top + height, left : left + width]


def decode_clip(
    src: Source,
    num_frames: int,
    fps: float,
    height: int | None = None,
    width: int | None = None,
    start: float = 0.0,
    threads: int = 1,
) -> np.ndarray:
    """`num_frames` frames at `fps` from time `start` (seconds) -> uint8 [F, H, W, 3].

    Raises VideoDecodeError for unreadable input, ClipTooShortError when the video ends
    before the clip does (the last frame may be held for at most half a source frame).
    `threads` is FFmpeg's decoder thread count (1: one loader worker = one core).
    """
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"need num_frames >= 1 and fps > 0, got {num_frames}, {fps}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    targets = [start + k / fps for k in range(num_frames)]
    out: list[np.ndarray | None] = [None] * num_frames
    with _open(src) as container:
        vs = container.streams.video[0]
        vs.codec_context.thread_count = max(0, int(threads))
        src_fps = _stream_fps(vs)
        half = 0.5 / src_fps
        t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None and vs.time_base else 0.0
        try:
            if start > 1.0:
                # Keyframe seek (backward): decoding then runs forward to `start`.
                container.seek(int((start + t0) / vs.time_base), stream=vs, backward=True, any_frame=False)
            k, prev, prev_t, cache = 0, None, None, None
            for frame in container.decode(vs):
                if frame.pts is None:
                    continue
                t = float(frame.pts * vs.time_base) - t0
                if prev is not None:
                    # targets before the midpoint between prev and this frame show prev
                    while k < num_frames and targets[k] <= (prev_t + t) / 2 + _TIE:
                        cache = cache if cache is not None and cache[0] is prev else (prev, _to_rgb(prev, height, width))
                        out[k] = cache[1]
                        k += 1
                if k == num_frames:
                    break
                prev, prev_t = frame, t
            if k < num_frames and prev is not None:
                # end of stream: the last frame covers half a source frame past its time
                while k < num_frames and targets[k] <= prev_t + half + 1e-6:
                    cache = cache if cache is not None and cache[0] is prev else (prev, _to_rgb(prev, height, width))
                    out[k] = cache[1]
                    k += 1
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"decoding failed: {exc}") from exc
        if prev is None:
            raise VideoDecodeError("no decodable frame")
        if k < num_frames:
            raise ClipTooShortError(
                f"video ends at {prev_t + half:.3f}s, clip of {num_frames} frames at {fps} fps from {start:.3f}s needs {targets[-1]:.3f}s"
            )
    return np.stack(out)


def iter_frames(src: Source, fps: float | None = None, height: int | None = None, width: int | None = None, max_frames: int | None = None, threads: int = 1) -> Iterator[np.ndarray]:
    """All frames of a video, optionally resampled to `fps` and resized/cropped (uint8 [H, W, 3])."""
    with _open(src) as container:
        vs = container.streams.video[0]
        vs.codec_context.thread_count = max(0, int(threads))
        src_fps = _stream_fps(vs)
        t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None and vs.time_base else 0.0
        k, prev, prev_t = 0, None, None
        try:
            for frame in container.decode(vs):
                if frame.pts is None:
                    continue
                t = float(frame.pts * vs.time_base) - t0
                if fps is None:
                    yield _to_rgb(frame, height, width)
                    k += 1
                else:
                    if prev is not None:
                        img = None
                        while k / fps <= (prev_t + t) / 2 + _TIE:
                            img = img if img is not None else _to_rgb(prev, height, width)
                            yield img
                            k += 1
                            if max_frames is not None and k >= max_frames:
                                return
                    prev, prev_t = frame, t
                if max_frames is not None and k >= max_frames:
                    return
            if fps is not None and prev is not None:
                img = None
                while k / fps <= prev_t + 0.5 / src_fps + 1e-6 and (max_frames is None or k < max_frames):
                    img = img if img is not None else _to_rgb(prev, height, width)
                    yield img
                    k += 1
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"decoding failed: {exc}") from exc


def encode_mp4(frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18, preset: str = "veryfast", pix_fmt: str = "yuv420p", options: dict | None = None, deterministic: bool = True) -> bytes:
    """uint8 [F, H, W, 3] RGB -> mp4 bytes (H.264 by default; H and W must be even for yuv420p)."""
    buf = io.BytesIO()
    _encode(buf, frames, fps, codec, crf, preset, pix_fmt, options, deterministic)
    return buf.getvalue()


def write_mp4(path: str | os.PathLike | BinaryIO, frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18, preset: str = "veryfast", pix_fmt: str = "yuv420p", options: dict | None = None, deterministic: bool = True) -> None:
    """Write uint8 [F, H, W, 3] RGB frames as an mp4 file (or into a binary file object).

    `crf` 0 with pix_fmt yuv444p is (near-)lossless; the RGB<->YUV conversion still costs
    about one grey level. `deterministic` (default) gives bit-identical files for
    identical frames: one encoder thread and, for x264, no macroblock-tree rate control
    (with it, this x264 build differed from run to run even single-threaded); False is
    faster and compresses slightly better.
    `frames` may be a CPU torch tensor or anything numpy can view.
    """
    if not hasattr(path, "write"):
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as fh:
            _encode(fh, frames, fps, codec, crf, preset, pix_fmt, options, deterministic)
    else:
        _encode(path, frames, fps, codec, crf, preset, pix_fmt, options, deterministic)


def _encode(fh, frames, fps, codec, crf, preset, pix_fmt, options, deterministic) -> None:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if pix_fmt in ("yuv420p", "yuv422p", "nv12") and (h % 2 or w % 2):
        raise ValueError(f"{pix_fmt} needs even height and width, got {h}x{w} (crop, pad or use pix_fmt='yuv444p')")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(fh, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        opts = {"threads": "1"} if deterministic else {}
        if codec in ("libx264", "libx265"):
            opts.update(crf=str(crf), preset=preset)
        if deterministic and codec == "libx264":
            opts["x264-params"] = "mbtree=0"
        opts.update({k: str(v) for k, v in (options or {}).items()})
        stream.options = opts
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def to_model_layout(frames: np.ndarray):
    """uint8 [F, H, W, 3] (or [B, F, H, W, 3]) -> float32 torch [3, F, H, W] ([B, 3, F, H, W]) in [-1, 1]."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(frames))
    t = t.movedim(-1, -4)  # channels before frames: the VAE / motion path's video layout
    return t.float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- motion scores
#
# Both scores are mean motion in pixels per frame (at the clip's target fps), measured
# on frames scaled to a 256-pixel short side, so that thresholds mean the same thing for
# either method and any source resolution.

MOTION_SHORT_SIDE = 256


def analysis_size(height: int, width: int, short_side: int, multiple: int = 2) -> tuple[int, int]:
    """(h, w) with the given short side, the aspect ratio kept, rounded to `multiple`."""
    scale = short_side / min(height, width)
    return (max(multiple, int(round(height * scale / multiple)) * multiple), max(multiple, int(round(width * scale / multiple)) * multiple))


def _box3(y: np.ndarray) -> np.ndarray:
    """3x3 box blur of [T, H, W] (edges replicated): widens the range the gradient sees."""
    p = np.pad(y, ((0, 0), (1, 1), (1, 1)), mode="edge")
    r = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return (r[:, :, :-2] + r[:, :, 1:-1] + r[:, :, 2:]) / 9.0


def framediff_motion(frames: np.ndarray) -> float:
    """Cheap motion score of uint8 frames [T, H, W, 3]: normal-flow speed in px/frame.

    Brightness constancy gives |dI/dt| = |v_n| |grad I| at an edge moving with normal
    speed v_n, so sum(|dI/dt| |grad I|) / sum(|grad I|^2) estimates the mean speed, unlike
    a plain mean frame difference, which also grows with texture and contrast. Valid for
    displacements up to a few pixels at the analysis size (it under-reads faster motion,
    which still scores high); 0 for a static or blank clip. Over edges of all
    orientations the normal speed averages 2/pi of the speed, hence the pi/2.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"need frames [T >= 2, H, W, 3], got {frames.shape}")
    y = _box3(frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    it = (y[1:] - y[:-1])[:, 1:-1, 1:-1]
    m = 0.5 * (y[1:] + y[:-1])
    gx = 0.5 * (m[:, 1:-1, 2:] - m[:, 1:-1, :-2])
    gy = 0.5 * (m[:, 2:, 1:-1] - m[:, :-2, 1:-1])
    g = np.sqrt(gx * gx + gy * gy)
    speed = float((np.abs(it) * g).sum() / ((g * g).sum() + 1e-3))
    return speed * (math.pi / 2) * MOTION_SHORT_SIDE / min(frames.shape[1], frames.shape[2])


class RaftMotion:
    """Mean RAFT flow magnitude between consecutive frames (px/frame at a 256-px short side).

    Weights are a torchvision RAFT state dict loaded through the same builder as
    training (`mogan_ds.models.builders.load_raft`); frames are scaled to a 256-pixel
    short side with H, W multiples of 8 (RAFT's requirement, >= 128).
    """

    def __init__(self, weights: str, arch: str = "raft_large", device: str = "cpu", iters: int = 12, pairs_per_batch: int = 8):
        import torch

        from mogan_ds.models.builders import load_raft

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_raft(weights, arch).to(self.device)
        self.iters, self.pairs_per_batch = iters, pairs_per_batch

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        return analysis_size(height, width, MOTION_SHORT_SIDE, multiple=8)

    def __call__(self, frames: np.ndarray) -> float:
        """frames: uint8 [T, h, w, 3] already at `size_for` the source (T >= 2)."""
        torch = self.torch
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] < 2 or frames.shape[1] % 8 or frames.shape[2] % 8:
            raise ValueError(f"need frames [T >= 2, H, W, 3] with H, W multiples of 8, got {frames.shape}")
        x = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, x.shape[0] - 1, self.pairs_per_batch):
                a = x[i : i + self.pairs_per_batch]
                b = x[i + 1 : i + 1 + self.pairs_per_batch]
                a = a[: b.shape[0]]
                flow = self.model(a, b, num_flow_updates=self.iters)[-1]
                total += float(flow.norm(dim=1).mean(dim=(1, 2)).sum())
                count += a.shape[0]
        return total / count * MOTION_SHORT_SIDE / min(frames.shape[1], frames.shape[2])


FRAMEDIFF_SHORT_SIDE = 128  # the cheap score works on small frames; the result is rescaled to 256


def motion_score(src: Source, fps: float, max_frames: int = 64, raft: RaftMotion | None = None, threads: int = 1) -> float:
    """Motion score of a video over its first `max_frames` frames at `fps` (see above).

    RAFT when a `RaftMotion` is given, the frame-difference estimate otherwise.
    Raises VideoDecodeError for unreadable input and ClipTooShortError below 2 frames.
    """
    info = probe_video(src)
    if raft is not None:
        h, w = raft.size_for(info.height, info.width)
    else:
        h, w = analysis_size(info.height, info.width, FRAMEDIFF_SHORT_SIDE)
    frames = list(iter_frames(src, fps=fps, height=h, width=w, max_frames=max_frames, threads=threads))
    if len(frames) < 2:
        raise ClipTooShortError(f"{len(frames)} frame(s) at {fps} fps: no motion to measure")
    frames = np.stack(frames)
    return raft(frames) if raft is not None else framediff_motion(frames)
