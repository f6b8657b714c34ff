"""The results table as the paper lays out Table 1 (markdown) and a PNG bar chart of its columns."""

from __future__ import annotations

from pathlib import Path

from .metrics import COLUMNS
from .weights import NOT_GIVEN

# (column, header, scale, decimals): the paper gives smoothness in %, the others as fractions.
TABLE = (
    ("motion_smoothness", "Smoothness (%)", 100.0, 1),
    ("dynamics_degree", "Dynamics", 1.0, 2),
    ("motion_score", "Motion Score", 1.0, 3),
    ("aesthetic_quality", "Aesthetic", 1.0, 2),
    ("imaging_quality", "Image Quality", 1.0, 2),
)


def fmt(value: float | None, scale: float = 1.0, decimals: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{decimals}f}"


def results_markdown(rows: list[dict], title: str = "") -> str:
    lines = [f"# {title}", ""] if title else []
    lines.append("| Model | Videos | " + " | ".join(h for _, h, _, _ in TABLE) + " |")
    lines.append("|---|---|" + "---|" * len(TABLE))
    for r in rows:
        cells = [fmt(r[c], s, d) for c, _, s, d in TABLE]
        lines.append(f"| {r['model']} | {r['num_videos']} | " + " | ".join(cells) + " |")
    lines += ["", "Weights behind each column (file, sha256 prefix):", ""]
    weights = rows[0]["weights"] if rows else {}
    for c, h, _, _ in TABLE:
        lines.append(f"- {h}: {weights.get(c, NOT_GIVEN)}")
    lines += [
        "",
        "Motion score = mean of smoothness and dynamics degree (both as fractions). "
        "Each metric follows VBench v0.1.5 (see docs/evaluation.md).",
    ]
    return "\n".join(lines) + "\n"


def summary_line(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        vals = " ".join(f"{c}={fmt(r[c])}" for c in COLUMNS)
        parts.append(f"{r['model']} ({r['num_videos']} videos): {vals}")
    return "[eval] " + "; ".join(parts)


def bar_chart(rows: list[dict], path: str | Path, width: int = 900, height: int = 420) -> None:
    """Grouped bars: one group per column (all on a 0..1 scale), one bar per model; n/a draws no bar."""
    from PIL import Image, ImageDraw

    palette = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193)]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 20, 40, height - 60
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - tick * (bottom - top)
        d.line([(left - 4, y), (right, y)], fill=(225, 225, 225) if tick else "black")
        d.text((8, y - 6), f"{tick:.2f}", fill="black")
    group_w = (right - left) / len(TABLE)
    n = max(1, len(rows))
    bar_w = group_w * 0.8 / n
    for g, (c, header, _, _) in enumerate(TABLE):
        x0 = left + g * group_w + group_w * 0.1
        for i, r in enumerate(rows):
            v = r[c]
            if v is None:
                d.text((x0 + i * bar_w + 2, bottom - 14), "n/a", fill="gray")
                continue
            y = bottom - max(0.0, min(1.0, v)) * (bottom - top)
            d.rectangle([x0 + i * bar_w, y, x0 + (i + 1) * bar_w - 2, bottom], fill=palette[i % len(palette)])
        d.text((left + g * group_w + 6, bottom + 8), header, fill="black")
    for i, r in enumerate(rows):
        x = left + 10 + i * 150
        d.rectangle([x, 12, x + 12, 24], fill=palette[i % len(palette)])
        d.text((x + 18, 12), str(r["model"])[:20], fill="black")
    img.save(path)
