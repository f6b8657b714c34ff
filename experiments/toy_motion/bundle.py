"""Kept stages as files that fit the GPU machine's way back (at most 8 files of 16 MiB, no
deeper than 2 folders under $OUT): `--save-stage` folders packed into one tar, identical files
stored once (the teacher's release holds the transformer twice: models/wan/transformer and
models/generator), split into parts of at most 15 MiB; and unpacked again.

    python -m experiments.toy_motion.bundle pack OUT/NAME.tar SAVED_DIR [SAVED_DIR ...]
    python -m experiments.toy_motion.bundle unpack 'OUT/NAME.tar' DEST   # reads NAME.tar.part000, ...
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
from pathlib import Path

PART_BYTES = 15 * 2**20


def pack(dest: str | Path, folders: list[str | Path], part_bytes: int = PART_BYTES) -> list[Path]:
    """Tar `folders` (each under its own name), a file whose content was already stored becoming a
    hard link to it; written as dest.part000, dest.part001, ... of at most `part_bytes` each."""
    buf = io.BytesIO()
    seen: dict[str, str] = {}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for folder in map(Path, folders):
            for p in sorted([folder, *folder.rglob("*")]):
                name = str(Path(folder.name) / p.relative_to(folder))
                if p.is_dir():
                    tf.add(p, name, recursive=False)
                    continue
                data = p.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                info = tf.gettarinfo(str(p), name)
                if sha in seen and len(data) > 4096:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, seen[sha], 0
                    tf.addfile(info)
                else:
                    seen.setdefault(sha, name)
                    tf.addfile(info, io.BytesIO(data))
    raw, dest = buf.getvalue(), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, max(1, len(raw)), part_bytes):
        part = dest.with_name(f"{dest.name}.part{i // part_bytes:03d}")
        part.write_bytes(raw[i : i + part_bytes])
        parts.append(part)
    return parts


def unpack(src: str | Path, dest: str | Path) -> list[Path]:
    """Join src.part000, ... and extract into `dest`; returns the top-level folders."""
    src = Path(src)
    parts = sorted(src.parent.glob(f"{src.name}.part[0-9][0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"no {src}.partNNN files")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)), mode="r") as tf:
        tops = sorted({m.name.split("/")[0] for m in tf.getmembers()})
        tf.extractall(dest, filter="data")
    return [dest / t for t in tops]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dest")
    p.add_argument("folders", nargs="+")
    u = sub.add_parser("unpack")
    u.add_argument("src")
    u.add_argument("dest")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        for part in pack(args.dest, args.folders):
            print(f"{part} {part.stat().st_size}")
    else:
        for top in unpack(args.src, args.dest):
            print(top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
