"""Inspect motion-corpus shards: counts, durations, motion histogram, and a full decode check.

    python data_tools/inspect_shards.py shards/                 # a folder
    python data_tools/inspect_shards.py 'shards/{000000..000099}.tar' --workers 8 --json report.json
    python data_tools/inspect_shards.py shards/ --fps 16 --num-frames 49   # usable for a recipe?

Every sample's video is decoded to its end (skip with --no-decode); unreadable shards,
samples without .mp4/.json, videos that do not decode as far as their header or
metadata say, and clips too short for --num-frames at --fps are listed by shard and
key. Exit status 1 if anything is wrong. The work is done by `mogan_ds.data.shard_inspect`.
"""

from __future__ import annotations

import argparse
import json
import sys

from mogan_ds.cli.errors import add_debug_flag, user_errors
from mogan_ds.data.shard_inspect import inspect_shards, report_lines
from mogan_ds.data.streaming import expand_shards


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", help="folder, glob, brace pattern or URL list ('::'-separated)")
    ap.add_argument("--no-decode", action="store_true", help="skip the frame-by-frame decode check")
    ap.add_argument("--fps", type=float, default=0.0, help="with --num-frames: flag clips too short for a recipe")
    ap.add_argument("--num-frames", type=int, default=0)
    ap.add_argument("--bins", type=int, default=10, help="motion histogram bins")
    ap.add_argument("--workers", type=int, default=1, help="shards inspected in parallel processes")
    ap.add_argument("--json", default="", help="also write the report as JSON here")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    with user_errors(args.debug, ap.prog) as outcome:  # a shard spec that names no shards: one line, exit 2
        urls = expand_shards(args.shards)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)
    report = inspect_shards(
        urls, decode=not args.no_decode, fps=args.fps, num_frames=args.num_frames, workers=args.workers, bins=args.bins
    )
    print("\n".join(report_lines(report)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
