"""PyAV encode/decode: frame selection at a target fps, resize + crop, verification, pixel
conversions, atomic writes, clear errors; motion scores."""

import os

import av
import numpy as np
import pytest
import torch

from mogan_ds.data.motion_score import RaftScorer, framediff_motion, motion_score
from mogan_ds.data.video import (
    ClipTooShortError,
    VideoDecodeError,
    count_frames,
    decode_clip,
    encode_mp4,
    even_size,
    iter_frames,
    probe_video,
    read_mp4,
    to_model_layout,
    to_uint8,
    to_unit,
    verify_video,
    write_mp4,
)
from mogan_ds.models.builders import build_raft, load_raft
from mogan_ds.motion.flow import RaftFlow


def level_video(num_frames=30, h=48, w=64):
    """Frame i is a flat grey of level 8 * i + 4: decoded values reveal which frame was picked."""
    levels = 8 * np.arange(num_frames) + 4
    return np.broadcast_to(levels[:, None, None, None], (num_frames, h, w, 3)).astype(np.uint8).copy()


def picked(frames):
    return np.round((frames[:, h_mid(frames), :, 1].mean(axis=1) - 4) / 8).astype(int)


def h_mid(frames):
    return frames.shape[1] // 2


def test_decode_picks_the_nearest_frames_at_the_target_fps(tmp_path):
    data = encode_mp4(level_video(30), fps=30, crf=0, pix_fmt="yuv444p")
    info = probe_video(data)
    assert (info.fps, info.num_frames, info.width, info.height) == (30.0, 30, 64, 48)
    assert info.frames_at(10) == 10 and info.frames_at(60) == 60
    # 30 -> 10 fps keeps every third frame; from 0.5 s that is frames 15, 18, ...
    assert picked(decode_clip(data, 5, 10, start=0.5)).tolist() == [15, 18, 21, 24, 27]
    # 30 -> 60 fps holds every frame twice
    assert picked(decode_clip(data, 6, 60)).tolist() == [0, 0, 1, 1, 2, 2]
    # the same from a file path, and a seek into a longer video
    write_mp4(tmp_path / "v.mp4", level_video(30), fps=15, crf=0, pix_fmt="yuv444p")
    assert picked(decode_clip(tmp_path / "v.mp4", 3, 5, start=1.2)).tolist() == [18, 21, 24]
    assert len(list(iter_frames(data, fps=10))) == 10 and len(list(iter_frames(data))) == 30


def test_values_survive_the_round_trip_and_land_in_model_layout():
    rng = np.random.default_rng(0)
    video = np.repeat(np.repeat(rng.integers(0, 256, (4, 12, 16, 3), dtype=np.uint8), 4, axis=1), 4, axis=2)
    back = decode_clip(encode_mp4(video, fps=8, crf=0, pix_fmt="yuv444p"), 4, 8)
    # yuv444 at crf 0: only the RGB<->YUV rounding remains
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 2.0
    t = to_model_layout(back)
    assert t.shape == (3, 4, 48, 64) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert torch.allclose(t[:, 2], torch.from_numpy(back[2]).permute(2, 0, 1).float() / 127.5 - 1)
    assert to_model_layout(np.stack([back, back])).shape == (2, 3, 4, 48, 64)


def test_resize_covers_then_centre_crops():
    video = np.zeros((3, 60, 120, 3), np.uint8)
    video[:, :, :30] = 255  # left quarter white: gone after a centre crop to a square
    clip = decode_clip(encode_mp4(video, fps=8, crf=0, pix_fmt="yuv444p"), 2, 8, height=32, width=32)
    assert clip.shape == (2, 32, 32, 3)
    assert clip.max() < 20  # the 60x120 frame scales to 32x64 and loses 16 columns each side


def test_clear_errors_for_corrupt_short_and_bad_input():
    data = encode_mp4(level_video(10), fps=10)
    with pytest.raises(VideoDecodeError, match="cannot open"):
        decode_clip(b"\x00not a video" * 50, 2, 10)
    with pytest.raises(VideoDecodeError):
        decode_clip(data[: len(data) // 2], 2, 10)  # truncated: the mp4 index (moov) is lost
    with pytest.raises(ClipTooShortError, match="needs"):
        decode_clip(data, 12, 10)
    with pytest.raises(ClipTooShortError):
        decode_clip(data, 2, 10, start=0.95)
    assert picked(decode_clip(data, 2, 10, start=0.8)).tolist() == [8, 9]
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 15, 16, 3), np.uint8), fps=8)
    with pytest.raises(TypeError, match="uint8"):
        encode_mp4(np.zeros((2, 16, 16, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(np.zeros((2, 16, 16, 3), np.uint8), fps=0)
    assert probe_video(encode_mp4(np.zeros((2, 15, 16, 3), np.uint8), fps=8, pix_fmt="yuv444p")).height == 15


def moving_square(speed, frames=12, size=96):
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.full((frames, size, size, 3), 40, np.uint8)
    for t in range(frames):
        cx = size / 2 - speed * (frames - 1) / 2 + speed * t
        out[t][(np.abs(xx - cx) < 12) & (np.abs(yy - size / 2) < 12)] = 220
    return out


def test_framediff_motion_is_zero_when_static_and_grows_with_speed():
    assert framediff_motion(moving_square(0.0)) == 0.0
    scores = [framediff_motion(moving_square(s)) for s in (0.5, 1.0, 2.0, 3.0)]
    assert scores == sorted(scores) and scores[0] > 0.1
    # px/frame at a 256-px short side: 1 px/frame on a 96-px clip reads about 256/96
    assert 0.6 * 256 / 96 < scores[1] < 1.6 * 256 / 96
    static, moving = (motion_score(encode_mp4(moving_square(s), fps=8), fps=8) for s in (0.0, 2.0))
    assert static < 0.05 < 1.0 < moving


def test_raft_score_is_the_training_raft_flow_magnitude(tmp_path):
    torch.manual_seed(0)
    torch.save(build_raft("raft_small").state_dict(), tmp_path / "raft_small.pth")
    raft = RaftScorer(str(tmp_path / "raft_small.pth"), "raft_small", iters=2)
    assert raft.size_for(96, 160) == (256, 424)
    assert isinstance(raft.flow, RaftFlow)  # one RAFT wrapper in the package: the motion path's
    score = motion_score(encode_mp4(moving_square(2.0, frames=3, size=64), fps=8), fps=8, raft=raft)
    assert np.isfinite(score) and score >= 0  # random weights: a finite magnitude, not a meaningful one
    # the score is RaftFlow's mean flow magnitude, rescaled from a 128-px to a 256-px short side
    frames = np.stack([np.roll(moving_square(2.0, frames=1, size=128)[0], 3 * t, axis=1) for t in range(3)])
    with torch.no_grad():
        flow = RaftFlow(load_raft(tmp_path / "raft_small.pth", "raft_small"), num_iters=2)(
            to_model_layout(frames)[None]
        )
    assert raft(frames) == pytest.approx(float(flow.norm(dim=1).mean()) * 256 / 128, rel=1e-5)
    with pytest.raises(ValueError, match="multiples of 8"):
        raft(np.zeros((2, 30, 30, 3), np.uint8))


def test_pixel_conversions_are_inverse_and_exact():
    levels = torch.arange(256, dtype=torch.uint8)
    unit = to_unit(levels)
    assert unit.dtype == torch.float32 and unit[0] == -1 and unit[-1] == 1
    assert torch.equal(unit, levels.float() / 127.5 - 1)
    assert torch.equal(to_uint8(unit), levels)  # every level survives the round trip
    clamped = to_uint8(torch.tensor([-3.0, 1.7, 0.0]))  # clamp, scale, round
    assert torch.equal(clamped, torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert to_unit(levels.numpy(), torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        to_unit(unit)


def test_write_mp4_is_atomic_pads_odd_sizes_on_request_and_takes_tensors(tmp_path, monkeypatch):
    frames = torch.from_numpy(level_video(4, 31, 45))
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", frames, fps=8)
    assert not os.listdir(tmp_path)  # a refused write leaves nothing behind
    write_mp4(tmp_path / "odd.mp4", frames, fps=8, pad_odd=True)
    back, fps = read_mp4(tmp_path / "odd.mp4")
    assert back.shape == (4, 32, 46, 3) and fps == 8
    assert np.abs(back[:, 31].astype(int) - back[:, 30].astype(int)).max() <= 2  # the last row repeated

    # an encoder failure mid-write leaves no file under the final name
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", boom)
    with pytest.raises(RuntimeError):
        write_mp4(tmp_path / "x.mp4", level_video(2), fps=8)
    assert sorted(os.listdir(tmp_path)) == ["odd.mp4"]


def test_verify_video_decodes_to_the_end(tmp_path):
    rng = np.random.default_rng(0)
    # index (moov) first, as web videos are: the file still opens when cut short
    write_mp4(tmp_path / "v.mp4", rng.integers(0, 256, (48, 48, 64, 3), dtype=np.uint8), fps=16, faststart=True)
    data = (tmp_path / "v.mp4").read_bytes()
    assert count_frames(data) == 48 and verify_video(data).num_frames == 48
    cut = data[: int(len(data) * 0.7)]
    # the header survives the cut and still promises 48 frames; the first ones decode
    assert probe_video(cut).num_frames == 48
    assert decode_clip(cut, 4, 8).shape == (4, 48, 64, 3)
    with pytest.raises(VideoDecodeError):
        verify_video(cut)


def test_crop_only_frames_are_the_source_pixels():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (3, 33, 47, 3), dtype=np.uint8)
    data = encode_mp4(video, fps=8, codec="libx264rgb", pix_fmt="rgb24", crf=0)
    assert np.array_equal(np.stack(list(iter_frames(data))), video)  # lossless at an odd size
    h, w = even_size(33, 47)
    cropped = np.stack(list(iter_frames(data, height=h, width=w, resize=False)))
    assert (h, w) == (32, 46) and np.array_equal(cropped, video[:, :32, :46])
    covered = np.stack(list(iter_frames(data, height=h, width=w)))  # resize-to-cover resamples
    assert not np.array_equal(covered, video[:, :32, :46])
    with pytest.raises(ValueError, match="crop"):
        list(iter_frames(data, height=40, width=40, resize=False))
