"""Stage 7's tables beyond the evaluator's: every model paired against the baselines on the same
videos, and the toy's extra columns with their intervals and what each column means here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .measure import BLOB_COLS, paired_difference

if TYPE_CHECKING:
    from .workdir import WorkFolder

#: Baselines of the paired comparisons: the DMD generator trained on with DMD alone for the
#: stage-6 steps (when the recipe has that row) and the stage-5 DMD generator.
PAIRED_BASES = ("dmd_control", "dmd")
#: column -> (markdown header, display scale)
PAIRED_COLS = {
    "mean_flow_magnitude": ("Mean flow (px/frame)", 1),
    "motion_smoothness": ("Smoothness (pp)", 100),
    "psnr_nearest_real": ("PSNR to nearest real (dB)", 1),
}


def paired_table(per_video: dict[str, list[dict]], n_boot: int) -> dict:
    """Every generated model against each baseline on the same videos (same caption and noise):
    {base: {model: {col: paired_difference}}}. Pairing removes the between-prompt spread that
    dominates the per-model intervals."""
    out = {}
    for base in PAIRED_BASES:
        if base not in per_video:
            continue
        out[base] = {
            name: {c: paired_difference(recs, per_video[base], c, n_boot) for c in PAIRED_COLS}
            for name, recs in per_video.items()
            if name != base
        }
    return out


def paired_markdown(paired: dict) -> str:
    lines = [
        "## Paired differences (same caption and noise; 95% bootstrap interval of the mean; videos higher)",
        "",
    ]
    for base, models in paired.items():
        lines += [
            f"Against `{base}`:",
            "",
            "| Model | " + " | ".join(h for h, _ in PAIRED_COLS.values()) + " |",
            "|---" * (len(PAIRED_COLS) + 1) + "|",
        ]
        for name, cols in models.items():
            cells = []
            for c, (_, scale) in PAIRED_COLS.items():
                d = cols[c]
                lo, hi = (x * scale for x in d["ci95"])
                cells.append(f"{d['mean'] * scale:+.3f} [{lo:+.3f}, {hi:+.3f}] ({d['higher']}/{d['videos']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def extra_table(rows: list[dict], r: dict, exp: WorkFolder) -> str:
    """The toy's extra columns with 95% bootstrap intervals, and what every column means here."""

    def cell(row, col, scale=1.0, dec=3):
        v, ci = row.get(col), row.get(f"{col}_ci95")
        if v is None:
            return "n/a"
        s = f"{v * scale:.{dec}f}"
        return s + (f" [{ci[0] * scale:.{dec}f}, {ci[1] * scale:.{dec}f}]" if ci else "")

    real = next(row for row in rows if "mean_flow_magnitude_exact" in row)
    lines = [
        "## With 95% bootstrap intervals (videos resampled)",
        "",
        "| Model | Videos | Dynamics | Smoothness (%) | Mean flow (px/frame) | PSNR to nearest real (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['num_videos']} | {cell(row, 'dynamics_degree', 1, 2)} | "
            f"{cell(row, 'motion_smoothness', 100, 2)} | {cell(row, 'mean_flow_magnitude', 1, 3)} | "
            f"{cell(row, 'psnr_nearest_real', 1, 2)} |"
        )
    lines += [
        "",
        f"{r['prompts']} held-out captions x seeds {r['seeds']} per model, the same noise for every model "
        "(generate.sample_seed). Teacher: CFG sampler "
        f"({exp.recipes['dmd']['schedule']['teacher_steps']} steps, guidance "
        f"{exp.recipes['dmd']['schedule']['teacher_guidance_scale']}); the others: the 3-step sampler.",
        "Dynamics: VBench's rule (evaluator's DynamicDegree) on the frozen toy RAFT at 20 iterations. "
        "Smoothness: VBench's frame-interpolation rule (evaluator's MotionSmoothness) with a flow-based "
        "interpolator on the toy RAFT, since AMT-S has no weights here. Mean flow: mean RAFT flow magnitude "
        "over all pixels and frame pairs; the real clips' exact mean flow (`synthetic.exact_flow`) is "
        f"{real['mean_flow_magnitude_exact']:.3f} px/frame, which the instrument reads as "
        f"{real['mean_flow_magnitude']:.3f}. Appearance: per-frame PSNR at "
        f"{r['nearest_size']}x{r['nearest_size']} to the nearest real training frame (higher = closer to the "
        "data's look). Aesthetic / imaging quality have no weights in the toy world (n/a).",
        "",
    ]
    lines += blob_table(rows, cell)
    # What every generated row is bounded by and how long each was trained: a reader of the table
    # needs both to tell "MoGAN did not help" from "nothing could move more through this decoder".
    vae, dmd, mogan = exp.report("vae"), exp.report("dmd"), exp.report("mogan")
    rows6 = list(exp.recipes["mogan"]["rows"])  # the report also holds the stage's "seconds"
    steps = sorted({mogan[name]["steps"] for name in rows6})
    lines += [
        f"Ceiling of every decoded row: the stage-3 VAE's reconstructions of held-out clips have a mean RAFT "
        f"flow of {vae['heldout_mean_flow_magnitude_recon']:.3f} px/frame against "
        f"{vae['heldout_mean_flow_magnitude_original']:.3f} for the originals (flow EPE recon vs original "
        f"{vae['heldout_flow_epe_recon_vs_original']:.3f} px, PSNR {vae['heldout_psnr_db']:.2f} dB). "
        f"DMD row: {dmd['steps']} DMD steps from the teacher; the stage-6 rows ({', '.join(rows6)}): "
        f"{' / '.join(map(str, steps))} steps each from that DMD generator, the same seed.",
        "",
    ]
    return "\n".join(lines)


def blob_table(rows: list[dict], cell) -> list[str]:
    """The captioned object per row (`measure.blob_motion`), real clips included."""
    lines = [
        "## The captioned object (colour blob tracked per frame; 95% bootstrap intervals)",
        "",
        "| Model | " + " | ".join(BLOB_COLS.values()) + " |",
        "|---" * (len(BLOB_COLS) + 1) + "|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(cell(row, c, 1, 2) for c in BLOB_COLS) + " |")
    lines += [
        "",
        "Per frame, the largest connected region in the caption's colour (any shading 0.5-1.05 of it, within "
        "40 RGB units; at least 1% of the frame): found or not, and its centroid. Blob found: the share of frames "
        "where it is. Its velocity is the centroid's least-squares slope over those frames. Moves as captioned: "
        "the share of videos whose caption gives a direction (object motion, or a pan, which moves the object "
        "the other way) where the blob is tracked, moves over 1 px/frame and within 45 degrees of that "
        "direction. Along caption: the velocity's component along the captioned direction; Speed / captioned: "
        "that over the caption's speed word's band middle (stage 1's world). Static captions: the blob's speed "
        "where the caption says static camera. Captions whose colour a mask cannot tell from their background "
        "(white on gray) are not scored.",
        "",
    ]
    return lines
