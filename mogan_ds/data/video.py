"""The one PyAV module: probe, decode, resample, verify and write videos; pixel conversions.

`torchvision.io.read_video` is gone in torchvision 0.29, so decoding goes through PyAV
directly. Frames are uint8 ``[F, H, W, 3]`` RGB numpy arrays on both sides; `to_unit` /
`to_uint8` are the package's only conversions between uint8 [0, 255] pixels and the
models' float [-1, 1] (`to_model_layout` adds the ``[3, F, H, W]`` layout).

Reading at a target fps is "sample and hold" resampling (`_Timeline`, the one
frame-timing loop): output frame k shows the source frame nearest to time
``start + k / fps``, so a 30 fps source read at 16 fps skips frames and an 8 fps source
read at 16 fps repeats them, exactly as ffmpeg's ``fps`` filter does. Only the frames up
to the clip's end are decoded and only the chosen ones are converted (swscale does the
resize in C, far cheaper than torch).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np
import torch

# A target time exactly halfway between two source frames takes the earlier one, so
# doubling the rate holds each frame twice (the tolerance absorbs float error).
_TIE = 1e-6

Source = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO

# Encoders that take x264's rate-control options (crf, preset, mbtree).
_X264 = ("libx264", "libx264rgb")


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


# --------------------------------------------------------------------------- pixels


def to_unit(frames: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float in [-1, 1] (``x / 127.5 - 1``), any layout and device.

    Computed in fp32 and cast once, so a bf16/fp16 result has a single rounding.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8:
        raise TypeError(f"to_unit expects uint8 pixels, got {x.dtype}")
    return x.to(torch.float32).div_(127.5).sub_(1.0).to(dtype)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 [0, 255]: clamp, scale, round (same layout and device).

    Rounding rather than diffusers' truncation: the unbiased choice, at most one level apart.
    """
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_model_layout(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] (or [B, F, H, W, 3]) -> float32 torch [3, F, H, W] ([B, 3, F, H, W]) in [-1, 1]."""
    # channels before frames: the VAE / motion path's video layout
    return to_unit(frames).movedim(-1, -4)


def even_size(height: int, width: int) -> tuple[int, int]:
    """The largest even (height, width) within the given size (4:2:0 chroma needs even sides)."""
    return height - height % 2, width - width % 2


# --------------------------------------------------------------------------- reading


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
        return VideoInfo(
            fps,
            frames,
            duration,
            vs.codec_context.width,
            vs.codec_context.height,
            vs.codec_context.name,
            container.format.name,
        )


def resized_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """Size to scale to before a centre crop to (height, width): the smallest cover."""
    scale = max(height / src_h, width / src_w)
    return max(height, math.ceil(src_h * scale - 1e-6)), max(width, math.ceil(src_w * scale - 1e-6))


def _to_rgb(frame, height: int | None, width: int | None, resize: bool = True) -> np.ndarray:
    """RGB uint8 [H, W, 3]: resized to cover (height, width) in swscale, then centre-cropped.

    None keeps the source size. ``resize=False`` only centre-crops (the frame must be at
    least that large): dropping an odd row/column must not resample every pixel.
    """
    if height is None or width is None:
        return frame.to_ndarray(format="rgb24")
    if resize:
        rh, rw = resized_size(frame.height, frame.width, height, width)
        img = frame.reformat(
            width=rw, height=rh, format="rgb24", interpolation="AREA" if rh < frame.height else "BILINEAR"
        ).to_ndarray()
    else:
        if height > frame.height or width > frame.width:
            raise ValueError(f"cannot crop a {frame.height}x{frame.width} frame to {height}x{width}")
        rh, rw = frame.height, frame.width
        img = frame.to_ndarray(format="rgb24")
    top, left = (rh - height) // 2, (rw - width) // 2
    return img[top : top + height, left : left + width]


class _Timeline:
    """(source frame, its time in s) for each output time ``start + k / fps``, k = 0, 1, ...

    Sample and hold: a target before the midpoint of two consecutive source frames shows
    the earlier one; past the last frame, that frame is held for half a source frame.
    With ``fps=None`` every decoded frame is yielded once. Decoding stops as soon as the
    consumer does. Raises VideoDecodeError where the stream cannot be decoded. `end` is
    how far the frames decoded so far reach (the last one's time plus half a frame).
    """

    def __init__(self, container, stream, fps: float | None, start: float = 0.0):
        self.container, self.stream, self.fps, self.start = container, stream, fps, start
        self.half = 0.5 / _stream_fps(stream)
        self.end: float | None = None

    def __iter__(self) -> Iterator[tuple[object, float]]:
        vs, fps, start = self.stream, self.fps, self.start
        t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None and vs.time_base else 0.0
        try:
            if start > 1.0:
                # Keyframe seek (backward): decoding then runs forward to `start`.
                self.container.seek(int((start + t0) / vs.time_base), stream=vs, backward=True, any_frame=False)
            k, prev, prev_t = 0, None, None
            for frame in self.container.decode(vs):
                if frame.pts is None:
                    continue
                t = float(frame.pts * vs.time_base) - t0
                self.end = t + self.half
                if fps is None:
                    yield frame, t
                    continue
                if prev is not None:
                    # targets before the midpoint between prev and this frame show prev
                    while start + k / fps <= (prev_t + t) / 2 + _TIE:
                        yield prev, prev_t
                        k += 1
                prev, prev_t = frame, t
            if fps is not None and prev is not None:
                # end of stream: the last frame covers half a source frame past its time
                while start + k / fps <= prev_t + self.half + 1e-6:
                    yield prev, prev_t
                    k += 1
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"decoding failed: {exc}") from exc


class _Converter:
    """Converts each source frame once, however many output frames hold it."""

    def __init__(self, height: int | None, width: int | None, resize: bool):
        self.size, self.resize, self.last = (height, width), resize, (None, None)

    def __call__(self, frame) -> np.ndarray:
        if self.last[0] is not frame:
            self.last = (frame, _to_rgb(frame, *self.size, resize=self.resize))
        return self.last[1]


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

    Resized to cover (height, width) and centre-cropped (None keeps the source size).
    Raises VideoDecodeError for unreadable input, ClipTooShortError when the video ends
    before the clip does (the last frame may be held for at most half a source frame).
    `threads` is FFmpeg's decoder thread count (1: one loader worker = one core).
    """
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"need num_frames >= 1 and fps > 0, got {num_frames}, {fps}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    out: list[np.ndarray] = []
    convert = _Converter(height, width, resize=True)
    with _open(src) as container:
        vs = container.streams.video[0]
        vs.codec_context.thread_count = max(0, int(threads))
        timeline = _Timeline(container, vs, fps, start)
        for frame, _ in timeline:
            out.append(convert(frame))
            if len(out) == num_frames:
                break
    if timeline.end is None:
        raise VideoDecodeError("no decodable frame")
    if len(out) < num_frames:
        raise ClipTooShortError(
            f"video ends at {timeline.end:.3f}s, clip of {num_frames} frames at {fps} fps from {start:.3f}s needs {start + (num_frames - 1) / fps:.3f}s"
        )
    return np.stack(out)


def iter_frames(
    src: Source,
    fps: float | None = None,
    height: int | None = None,
    width: int | None = None,
    max_frames: int | None = None,
    threads: int = 1,
    resize: bool = True,
) -> Iterator[np.ndarray]:
    """All frames of a video (uint8 [H, W, 3]), optionally resampled to `fps`.

    (height, width): resize to cover and centre-crop, or with ``resize=False`` only
    centre-crop (e.g. `even_size` of the source: drops an odd row/column, no resampling).
    """
    if max_frames is not None and max_frames <= 0:
        return
    convert = _Converter(height, width, resize)
    with _open(src) as container:
        vs = container.streams.video[0]
        vs.codec_context.thread_count = max(0, int(threads))
        for k, (frame, _) in enumerate(_Timeline(container, vs, fps), 1):
            yield convert(frame)
            if max_frames is not None and k >= max_frames:
                return


def count_frames(src: Source, threads: int = 1) -> int:
    """Decode every frame to the end (no pixel conversion) and count them.

    Raises VideoDecodeError where decoding fails, e.g. a file cut short whose header
    survived (its header still promises every frame).
    """
    with _open(src) as container:
        vs = container.streams.video[0]
        vs.codec_context.thread_count = max(0, int(threads))
        return sum(1 for _ in _Timeline(container, vs, None))


def verify_video(src: Source, threads: int = 1) -> VideoInfo:
    """Header facts of a video that decodes to the end, with the decoded frame count.

    Raises VideoDecodeError when decoding fails or the decoded count and the header's
    differ by more than one frame (the slack absorbs headers that count an edit-list
    frame the decoder drops). The returned ``num_frames`` is the smaller of the two: the
    span a reader can rely on.
    """
    info = probe_video(src)
    n = count_frames(src, threads)
    if n == 0:
        raise VideoDecodeError("no decodable frame")
    if info.num_frames and abs(n - info.num_frames) > 1:
        raise VideoDecodeError(f"decoded {n} frames, container says {info.num_frames} (truncated or damaged)")
    return dataclasses.replace(info, num_frames=min(n, info.num_frames or n))


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of a video as uint8 RGB [F, H, W, 3], and its frame rate."""
    frames = list(iter_frames(path))
    if not frames:
        raise VideoDecodeError(f"{path}: no video frames decoded")
    return np.stack(frames), probe_video(path).fps


# --------------------------------------------------------------------------- writing


def encode_mp4(
    frames,
    fps: float,
    codec: str = "libx264",
    crf: int = 18,
    preset: str = "veryfast",
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
    deterministic: bool = True,
    pad_odd: bool = False,
) -> bytes:
    """uint8 [F, H, W, 3] RGB -> mp4 bytes (see `write_mp4` for the arguments)."""
    buf = io.BytesIO()
    _encode(buf, frames, fps, codec, crf, preset, pix_fmt, options, deterministic, pad_odd)
    return buf.getvalue()


def write_mp4(
    path: str | os.PathLike | BinaryIO,
    frames,
    fps: float,
    codec: str = "libx264",
    crf: int = 18,
    preset: str = "veryfast",
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
    deterministic: bool = True,
    pad_odd: bool = False,
    faststart: bool = False,
) -> None:
    """Write uint8 [F, H, W, 3] RGB frames (numpy or a torch tensor) as an mp4 file or into a binary file object.

    A path is written to ``<path>.tmp`` and renamed, so an interrupted run never leaves a
    truncated mp4 that looks finished. H.264 by default; 4:2:0 pixel formats need even
    H and W: odd sizes raise unless ``pad_odd`` repeats the last row/column. `crf` 0 with
    pix_fmt yuv444p is near-lossless (the RGB<->YUV conversion costs about one grey
    level); codec ``libx264rgb`` with pix_fmt ``rgb24`` and crf 0 is lossless at any size.
    `deterministic` (default) gives bit-identical files for identical frames: one encoder
    thread and, for x264, no macroblock-tree rate control (with it, this x264 build
    differed from run to run even single-threaded); False is faster and compresses
    slightly better. `faststart` (paths only: the muxer rewrites the file) puts the mp4
    index first, as web videos do, so a reader can start before the whole file is there.
    """
    if hasattr(path, "write"):
        if faststart:
            raise ValueError("faststart needs a path: the muxer moves the index by rewriting the file")
        _encode(path, frames, fps, codec, crf, preset, pix_fmt, options, deterministic, pad_odd)
        return
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        if faststart:
            _encode(
                tmp,
                frames,
                fps,
                codec,
                crf,
                preset,
                pix_fmt,
                options,
                deterministic,
                pad_odd,
                {"movflags": "faststart"},
            )
        else:
            with open(tmp, "wb") as fh:
                _encode(fh, frames, fps, codec, crf, preset, pix_fmt, options, deterministic, pad_odd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _encode(
    fh, frames, fps, codec, crf, preset, pix_fmt, options, deterministic, pad_odd, container_options=None
) -> None:
    frames = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, h, w, _ = frames.shape
    if pix_fmt in ("yuv420p", "yuv422p", "nv12") and (h % 2 or w % 2):
        if not pad_odd:
            raise ValueError(
                f"{pix_fmt} needs even height and width, got {h}x{w} (crop, pad_odd=True or pix_fmt='yuv444p')"
            )
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(fh, mode="w", format="mp4", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        opts = {"threads": "1"} if deterministic else {}
        if codec in _X264 or codec == "libx265":
            opts.update(crf=str(crf), preset=preset)
        if deterministic and codec in _X264:
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
