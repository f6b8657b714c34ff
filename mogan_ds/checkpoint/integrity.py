"""A checkpoint's manifest (the size and CRC-32 of every file it holds) and its verification.

The manifest is the content of the checkpoint's ``COMPLETE`` marker, written by rank 0 after
every rank has written and fsync'ed its files::

    {"format": 1, "step": 8, "checksum": "crc32", "bytes": 123456,
     "files": {"generator/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": [size, "1a2b3c4d"], ...}}

A ``COMPLETE`` holding just the step number is a checkpoint written before manifests
existed: complete, but nothing to verify it against.

`check_files` is what ``--resume`` runs over its share of a checkpoint's files (`share`
splits them over the ranks by size, so the reads run in parallel): existence and size
always (a stat per file), the CRC-32 as well with ``--verify``
(``output.verify_on_resume=checksums``), which reads every byte once across all ranks. Sizes
catch a truncated file (a node that died while the filesystem flushed); only checksums
catch flipped bytes, which torch's zip reader would load without complaint.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

FORMAT = 1
MARKER = "COMPLETE"
CHUNK = 8 << 20


class ManifestError(ValueError):
    """The COMPLETE marker exists but cannot be read as a manifest."""


def crc32_file(path: str | Path) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits) of a file, streamed."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def manifest_text(step: int, files: dict[str, tuple[int, str]]) -> str:
    entries = {rel: [int(size), crc] for rel, (size, crc) in sorted(files.items())}
    total = sum(size for size, _ in entries.values())
    doc = {"format": FORMAT, "step": step, "checksum": "crc32", "bytes": total, "files": entries}
    return json.dumps(doc, indent=0) + "\n"


def read_manifest(ckpt: Path) -> dict | None:
    """The manifest of a checkpoint; None for one written before manifests (a bare step number).

    Raises ManifestError when COMPLETE is neither (truncated or damaged itself).
    """
    marker = ckpt / MARKER
    try:
        text = marker.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{marker}: unreadable ({e})") from None
    if text.strip().isdigit():
        return None
    try:
        doc = json.loads(text)
        files = doc["files"]
        if doc.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("unknown manifest format")
        return doc
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{marker}: not a manifest ({e})") from None


def share(files: dict[str, list], rank: int, world: int) -> list[str]:
    """This rank's part of `files` (relative path -> [size, ...]): largest first, each to the
    least-loaded rank, so every rank reads about as many bytes. The same on every rank."""
    load = [0] * world
    mine = []
    for rel in sorted(files, key=lambda r: (-int(files[r][0]), r)):
        owner = min(range(world), key=lambda w: (load[w], w))
        load[owner] += int(files[rel][0])
        if owner == rank:
            mine.append(rel)
    return mine


def check_files(ckpt: Path, files: dict[str, list], names: list[str], checksums: bool) -> list[str]:
    """Problems of `names` (relative paths in `files`, the manifest's entries): missing,
    wrong size, or (with `checksums`) wrong CRC-32. Empty when all match."""
    problems = []
    for rel in names:
        size, crc = int(files[rel][0]), files[rel][1]
        path = ckpt / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        except OSError as e:
            problems.append(f"{rel}: unreadable ({e.strerror or e})")
            continue
        if actual != size:
            what = "truncated" if actual < size else "longer than written"
            problems.append(f"{rel}: {actual} bytes, the manifest recorded {size} ({what})")
            continue
        if checksums:
            try:
                _, got = crc32_file(path)
            except OSError as e:
                problems.append(f"{rel}: unreadable ({e.strerror or e})")
                continue
            if got != crc:
                problems.append(f"{rel}: CRC-32 {got}, the manifest recorded {crc} (damaged content)")
    return problems
