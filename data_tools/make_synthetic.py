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
The work is done by `mogan_ds.data.synthetic`.
"""

from __future__ import annotations

import argparse
import sys

from mogan_ds.data.synthetic import write_synthetic_corpus


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 160x160, got {text!r}") from None
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"size must be even and >= 16 on both sides, got {text!r}")
    return h, w


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
    return write_synthetic_corpus(
        args.out,
        num_clips=args.num_clips,
        frames=args.frames,
        size=args.size,
        fps=args.fps,
        shards=args.shards,
        seed=args.seed,
        crf=args.crf,
        prompts=args.prompts,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
