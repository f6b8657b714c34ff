"""Shard tools: synthetic corpus, building with the motion/length filters and resume, inspection."""

import json
import os
import sys

import numpy as np
import pytest
import webdataset as wds

from mogan_ds.data.shards import expand_shards, iter_shard, slot_split, write_tar_atomic
from mogan_ds.data.video import encode_mp4, write_mp4

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_tools"))
import build_shards  # noqa: E402
import inspect_shards  # noqa: E402
import make_synthetic  # noqa: E402


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


def test_build_filters_counts_and_resumes(video_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = ["--input", str(video_folder), "--out", str(out), "--fps", "8", "--min-frames", "9", "--min-motion", "0.5", "--samples-per-shard", "2"]
    summary = build_shards.main(argv + ["--workers", "2"])  # 4 shards over 2 spawned processes
    assert (summary["items"], summary["kept"], summary["filtered_short"], summary["filtered_motion"], summary["failed"]) == (8, 5, 1, 1, 1)
    assert summary["failures"][0][0].endswith("broken.mp4")
    samples = _samples(out)
    assert len(samples) == 5 and all(len(k) == 6 and k.isdigit() for k in samples)
    metas = {os.path.basename(m["source"]): m for m, _ in samples.values()}
    assert set(metas) == {"move0.mp4", "move1.mp4", "move2.mp4", "move3.mp4", "sub_move.mov"}
    m = metas["move0.mp4"]
    assert m["caption"] == "a square slides right" and (m["fps"], m["num_frames"], m["width"], m["height"]) == (16.0, 24, 64, 64)
    assert m["motion_method"] == "framediff" and m["frames_at_target_fps"] == 12
    speeds = [metas[f"move{i}.mp4"]["motion"] for i in range(4)]
    assert speeds == sorted(speeds) and speeds[0] > 0.5
    # a re-run finds every shard finished and builds nothing
    again = build_shards.main(argv + ["--workers", "1"])
    assert again["built_now"] == 0 and again["kept"] == 5
    # losing one shard rebuilds exactly that one, with the same content
    victim = sorted(p for p in os.listdir(out) if p.endswith(".tar"))[0]
    before = (out / victim).read_bytes()
    os.remove(out / victim)
    third = build_shards.main(argv + ["--workers", "1"])
    assert third["built_now"] == 1 and (out / victim).read_bytes() == before
    # other options on the same folder are refused instead of mixing two filters
    with pytest.raises(SystemExit, match="other options"):
        build_shards.main(argv[:-2] + ["--min-motion", "9"])
    report = inspect_shards.main([str(out), "--fps", "8", "--num-frames", "9"])
    assert report["samples"] == 5 and report["good"] == 5 and report["problems"] == []
    assert "every sample decodes" in capsys.readouterr().out


def test_manifest_input_and_transcoding(video_folder, tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": str(video_folder / f), "caption": f"clip {f}"}) for f in ("move1.mp4", "short.mp4")) + "\n")
    out = tmp_path / "t"
    summary = build_shards.main(["--input", str(manifest), "--out", str(out), "--fps", "8", "--min-frames", "9", "--transcode", "--short-side", "32", "--max-frames", "10", "--workers", "1"])
    assert (summary["kept"], summary["filtered_short"]) == (1, 1)
    (meta, data), = _samples(out).values()
    assert meta["caption"] == "clip move1.mp4" and (meta["fps"], meta["num_frames"], meta["width"], meta["height"]) == (8.0, 10, 32, 32)
    from mogan_ds.data.video import probe_video

    info = probe_video(data)
    assert (info.fps, info.num_frames, info.width) == (8.0, 10, 32)


def test_synthetic_corpus_has_known_motion_and_is_reproducible(tmp_path):
    argv = ["--num-clips", "12", "--frames", "12", "--size", "64x96", "--fps", "8", "--shards", "3", "--seed", "3"]
    make_synthetic.main(["--out", str(tmp_path / "a"), "--prompts", str(tmp_path / "a" / "prompts.txt")] + argv)
    make_synthetic.main(["--out", str(tmp_path / "b")] + argv)
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
    make_synthetic.main(["--out", str(tmp_path / "a"), "--prompts", str(tmp_path / "a" / "prompts.txt")] + argv)
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
    report = inspect_shards.main([str(tmp_path), "--json", str(tmp_path / "r.json")])
    problems = {(os.path.basename(u), k) for u, k, _ in report["problems"]}
    assert ("000000.tar", "000001") in problems and ("000000.tar", "000002") in problems
    assert ("000001.tar", "<shard>") in problems
    assert json.load(open(tmp_path / "r.json"))["good"] >= 1


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
