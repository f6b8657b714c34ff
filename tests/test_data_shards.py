"""Shard tools: synthetic corpus, building with the motion/length filters, damage checks and
resume, lossless re-encoding of odd sizes, inspection, and the thin command lines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

from mogan_ds.data.shard_build import read_inputs, run_build, write_tar_atomic
from mogan_ds.data.shard_inspect import inspect_shards, report_lines
from mogan_ds.data.streaming import expand_shards, iter_shard, slot_split
from mogan_ds.data.synthetic import write_synthetic_corpus
from mogan_ds.data.video import encode_mp4, iter_frames, probe_video, write_mp4

BUILD = dict(fps=8, min_frames=9, min_motion=0.5)


def build(inputs, out, samples_per_shard=2, workers=1, **opts):
    items = read_inputs(str(inputs)) if not isinstance(inputs, list) else inputs
    return run_build(
        items, str(out), {**BUILD, **opts}, samples_per_shard=samples_per_shard, workers=workers, echo=lambda s: None
    )


def square_clip(speed, frames, size=64):
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.full((frames, size, size, 3), 30, np.uint8)
    for t in range(frames):
        cx = size / 2 - speed * (frames - 1) / 2 + speed * t
        out[t][(np.abs(xx - cx) < 8) & (np.abs(yy - size / 2) < 8)] = (200, 80, 40)
    return out


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Moving clips (one captioned, one .mov), a static one, a too-short one and a corrupt file."""
    d = tmp_path_factory.mktemp("videos")
    for i, speed in enumerate((1.5, 2.5, 3.5, 4.5)):
        write_mp4(d / f"move{i}.mp4", square_clip(speed, 24), fps=16)
    (d / "move0.txt").write_text("a square slides right\n")
    write_mp4(d / "static.mp4", square_clip(0.0, 24), fps=16)
    write_mp4(d / "short.mp4", square_clip(3.0, 6), fps=16)
    with open(d / "sub_move.mov", "wb") as fh:  # non-mp4 container name: still read; re-encoded if not mp4
        fh.write(encode_mp4(square_clip(2.0, 24), fps=16))
    (d / "broken.mp4").write_bytes(b"\x00\x01garbage" * 100)
    return d


def _samples(out):
    return {s["__key__"]: (json.loads(s["json"]), s["mp4"]) for u in expand_shards(str(out)) for s in iter_shard(u)}


def test_build_filters_counts_and_resumes(video_folder, tmp_path):
    out = tmp_path / "shards"
    summary = build(video_folder, out, workers=2)  # 4 shards over 2 spawned processes
    assert (
        summary["items"],
        summary["kept"],
        summary["filtered_short"],
        summary["filtered_motion"],
        summary["failed"],
    ) == (8, 5, 1, 1, 1)
    assert summary["failures"][0][0].endswith("broken.mp4")
    samples = _samples(out)
    assert len(samples) == 5 and all(len(k) == 6 and k.isdigit() for k in samples)
    metas = {os.path.basename(m["source"]): m for m, _ in samples.values()}
    assert set(metas) == {"move0.mp4", "move1.mp4", "move2.mp4", "move3.mp4", "sub_move.mov"}
    m = metas["move0.mp4"]
    assert m["caption"] == "a square slides right" and (m["fps"], m["num_frames"], m["width"], m["height"]) == (
        16.0,
        24,
        64,
        64,
    )
    assert m["motion_method"] == "framediff" and m["frames_at_target_fps"] == 12
    speeds = [metas[f"move{i}.mp4"]["motion"] for i in range(4)]
    assert speeds == sorted(speeds) and speeds[0] > 0.5
    # a re-run finds every shard finished and builds nothing
    again = build(video_folder, out)
    assert again["built_now"] == 0 and again["kept"] == 5
    # losing one shard rebuilds exactly that one, with the same content
    victim = sorted(p for p in os.listdir(out) if p.endswith(".tar"))[0]
    before = (out / victim).read_bytes()
    os.remove(out / victim)
    third = build(video_folder, out)
    assert third["built_now"] == 1 and (out / victim).read_bytes() == before
    # other options on the same folder are refused instead of mixing two filters
    with pytest.raises(FileExistsError, match=r"other options.*min_motion \(0.5 then, 9 now\)"):
        build(video_folder, out, min_motion=9)
    report = inspect_shards(str(out), fps=8, num_frames=9)
    assert report["samples"] == 5 and report["good"] == 5 and report["problems"] == []
    assert "OK: every sample decodes" in report_lines(report)


def test_manifest_input_and_transcoding(video_folder, tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps({"path": str(video_folder / f), "caption": f"clip {f}"}) for f in ("move1.mp4", "short.mp4")
        )
        + "\n"
    )
    out = tmp_path / "t"
    summary = build(manifest, out, samples_per_shard=200, min_motion=0.0, transcode=True, short_side=32, max_frames=10)
    assert (summary["kept"], summary["filtered_short"]) == (1, 1)
    ((meta, data),) = _samples(out).values()
    assert meta["caption"] == "clip move1.mp4" and (meta["fps"], meta["num_frames"], meta["width"], meta["height"]) == (
        8.0,
        10,
        32,
        32,
    )
    info = probe_video(data)
    assert (info.fps, info.num_frames, info.width) == (8.0, 10, 32)


def test_synthetic_corpus_has_known_motion_and_is_reproducible(tmp_path):
    kw = dict(num_clips=12, frames=12, size=(64, 96), fps=8, shards=3, seed=3, echo=lambda s: None)
    write_synthetic_corpus(str(tmp_path / "a"), prompts=str(tmp_path / "a" / "prompts.txt"), **kw)
    write_synthetic_corpus(str(tmp_path / "b"), **kw)
    a, b = _samples(tmp_path / "a"), _samples(tmp_path / "b")
    assert len(expand_shards(str(tmp_path / "a"))) == 3 and sorted(a) == [f"{i:06d}" for i in range(12)]
    assert list(a.values()) == list(b.values())  # bit-identical videos and metadata
    metas = [m for m, _ in a.values()]
    assert all(m["width"] == 96 and m["height"] == 64 and m["num_frames"] == 12 and m["caption"] for m in metas)
    static = [m for m in metas if m["kind"] == "static"]
    moving = [m for m in metas if m["kind"] != "static"]
    assert static and moving and all(m["speed"] == 0 and m["motion"] < 0.1 for m in static)
    assert all(m["motion"] > 0.5 for m in moving)
    assert (tmp_path / "a" / "prompts.txt").read_text().splitlines() == [m["caption"] for m in metas]
    # a second call with the same arguments is a no-op (the demo calls it at every start)
    mtime = os.path.getmtime(tmp_path / "a" / "000000.tar")
    write_synthetic_corpus(str(tmp_path / "a"), prompts=str(tmp_path / "a" / "prompts.txt"), **kw)
    assert os.path.getmtime(tmp_path / "a" / "000000.tar") == mtime


def test_inspect_reports_bad_samples_and_unreadable_shards(tmp_path):
    good = encode_mp4(square_clip(2.0, 8), fps=8)
    write_tar_atomic(
        str(tmp_path / "000000.tar"),
        [
            {"__key__": "000000", "mp4": good, "json": json.dumps({"motion": 1.0}).encode()},
            {"__key__": "000001", "mp4": good[:300], "json": b"{}"},
            {"__key__": "000002", "mp4": good},
        ],
    )
    (tmp_path / "000001.tar").write_bytes((tmp_path / "000000.tar").read_bytes()[:1536])  # cut mid-archive
    report = inspect_shards(str(tmp_path))
    problems = {(os.path.basename(u), k) for u, k, _ in report["problems"]}
    assert ("000000.tar", "000001") in problems and ("000000.tar", "000002") in problems
    assert ("000001.tar", "<shard>") in problems
    assert report["good"] >= 1 and report_lines(report)[-1] == f"{len(report['problems'])} problem(s)"


def test_slot_split_is_disjoint_and_covering():
    urls = [f"s{i}.tar" for i in range(10)]
    seen = []
    for r in range(2):
        for w in range(3):
            slot = slot_split(urls, r, 2, w, 3)
            assert slot.mod == 1 and slot.offsets == [0] * len(slot.urls)
            seen += slot.urls
    assert sorted(seen) == sorted(urls)
    # fewer shards than slots: slots share shards and split them by sample position
    assert slot_split(urls[:3], 1, 4, 1, 2) == (["s1.tar"], 4, 1, [1])  # offsets 0, 1, 2 of mod 4
    assert slot_split(urls[:1], 3, 4, 1, 2) == (urls[:1], 8, 7, [0])
    assert slot_split(urls[:5], 1, 4, 1, 2) == (["s1.tar"], 2, 1, [0])
    # every sample has exactly one owner, and with enough samples per shard every slot
    # gets some, whichever level splits by sample
    for n, dp, nw, per_shard in ((3, 2, 3, 3), (4, 8, 1, 2), (2, 4, 3, 6), (5, 2, 4, 2)):
        owners = {}
        for r in range(dp):
            for w in range(nw):
                slot = slot_split(urls[:n], r, dp, w, nw)
                for i, u in enumerate(slot.urls):
                    for j in range(per_shard):
                        if slot.keeps(i, j):
                            owners.setdefault((u, j), []).append((r, w))
        assert len(owners) == n * per_shard and all(len(v) == 1 for v in owners.values()), (n, dp, nw)
        assert len({v[0] for v in owners.values()}) == dp * nw, (n, dp, nw)
    with pytest.raises(FileNotFoundError):
        expand_shards("/nonexistent/dir/*.tar")
    assert expand_shards("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert len(expand_shards("http://h/x-{0..1}.tar::pipe:cat y.tar")) == 3
    assert wds.__version__  # the installed webdataset does the brace/URL expansion


def test_a_video_cut_short_is_failed_not_kept(tmp_path):
    """The header of a cut faststart mp4 promises every frame; the builder must decode to the end."""
    d = tmp_path / "in"
    write_mp4(d / "whole.mp4", square_clip(2.0, 48), fps=16, faststart=True)
    write_mp4(d / "cut.mp4", square_clip(3.0, 48), fps=16, faststart=True)
    data = (d / "cut.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(data[: int(len(data) * 0.7)])
    assert probe_video(d / "cut.mp4").num_frames == 48  # still looks whole from its header
    # the motion score reads only the first 4 frames at 8 fps, which the cut leaves intact
    summary = build(d, tmp_path / "out", score_frames=4, min_motion=0.0)
    assert (summary["kept"], summary["failed"], summary["filtered_short"]) == (1, 1, 0)
    assert summary["failures"][0][0].endswith("cut.mp4") and "decod" in summary["failures"][0][1]
    ((meta, _),) = _samples(tmp_path / "out").values()
    assert meta["source"].endswith("whole.mp4") and meta["num_frames"] == 48
    assert inspect_shards(str(tmp_path / "out"))["problems"] == []  # what the builder keeps, its inspector accepts


def test_reencoding_an_odd_size_crops_instead_of_resampling(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (16, 33, 47, 3), dtype=np.uint8)
    src[:, 10:20, :] = np.arange(16, dtype=np.uint8)[:, None, None, None] * 12  # some motion
    lossless = dict(codec="libx264rgb", pix_fmt="rgb24", crf=0)
    write_mp4(tmp_path / "in" / "odd.mp4", src, fps=8, **lossless)
    summary = build(tmp_path / "in", tmp_path / "out", min_motion=0.0, transcode=True, **lossless)
    assert summary["kept"] == 1, summary
    ((meta, data),) = _samples(tmp_path / "out").values()
    assert (meta["height"], meta["width"], meta["num_frames"]) == (32, 46, 16)
    stored = np.stack(list(iter_frames(data)))
    assert np.array_equal(stored, src[:, :32, :46])  # one row and one column dropped, nothing resampled


def test_command_lines_are_thin_and_report_bad_input_in_one_line(video_folder, tmp_path, repo_root):
    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=300)

    out = tmp_path / "cli"
    r = run(
        "data_tools/build_shards.py",
        "--input",
        str(video_folder),
        "--out",
        str(out),
        "--fps",
        "8",
        "--min-frames",
        "9",
        "--min-motion",
        "0.5",
        "--samples-per-shard",
        "4",
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "kept 5 / filtered short 1 / filtered motion 1 / failed 1 of 8 inputs" in r.stdout
    r = run("data_tools/inspect_shards.py", str(out), "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0 and "OK: every sample decodes" in r.stdout
    assert json.load(open(tmp_path / "r.json"))["good"] == 5
    r = run("data_tools/build_shards.py", "--input", str(tmp_path / "nowhere"), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nowhere: no such folder" in r.stderr
