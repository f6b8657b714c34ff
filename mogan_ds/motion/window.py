"""The GAN's decoding window: which latent chunks of a clip the motion path sees.

A window is latent chunks [start, start + length) of a clip of `num_latent` chunks; it
decodes to pixel frames `pixel_frame_range(start, length)`. `WindowSpec` is the one place
that parses `gan.window_start`, checks that the window fits the clip (config validation
calls it), and draws each step's start; `MotionPath` holds one and slices fake latents and
real clips with the `Window` it draws, so generator samples and real clips always show the
discriminator the same span of time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .latents import pixel_frame_range

RANDOM = "random"


@dataclass(frozen=True)
class Window:
    """Latent chunks [start, start + length) of one step."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def frames(self) -> tuple[int, int]:
        """Half-open pixel-frame range [first, stop) the window decodes to."""
        return pixel_frame_range(self.start, self.length)

    @property
    def context_frames(self) -> int:
        """Pixel frames from frame 0 to the window's end: what a causal encoder must see to
        produce exactly the latents a whole clip has at these chunks."""
        return self.frames[1]


@dataclass(frozen=True)
class WindowSpec:
    """`gan.window` and `gan.window_start` for a clip of `num_latent` latent chunks.

    Args:
        num_latent: latent chunks of a clip (`Config.latent_frames`).
        length: `gan.window`, latent chunks decoded with gradient.
        start: a fixed first chunk, or "random" (uniform over the starts that fit).
        min_start: the first allowed start. In flow space a one-chunk window never starts
            at chunk 0, which decodes to a single frame (no flow between frames).
    """

    num_latent: int
    length: int
    start: int | str = RANDOM
    min_start: int = 0

    @classmethod
    def from_config(cls, gan_cfg, num_latent: int) -> WindowSpec:
        """Parse and check `gan.window` / `gan.window_start` (raises ValueError saying why)."""
        raw = gan_cfg.window_start
        if isinstance(raw, str) and raw.strip() == RANDOM:
            start: int | str = RANDOM
        else:
            try:
                start = int(raw)
            except (TypeError, ValueError):
                raise ValueError(f"expected {RANDOM!r} or an integer chunk index, got {raw!r}") from None
        min_start = 1 if gan_cfg.space == "flow" and gan_cfg.window == 1 else 0
        spec = cls(num_latent, int(gan_cfg.window), start, min_start)
        spec.check()
        return spec

    def fitting(self) -> range:
        """Every first chunk at which the window fits the clip: `min_start` to
        `num_latent - length` (empty if it fits nowhere)."""
        return range(self.min_start, self.num_latent - self.length + 1)

    def starts(self) -> range:
        """The first chunks this spec takes: the fixed start alone, or every fitting one."""
        return self.fitting() if self.start == RANDOM else range(int(self.start), int(self.start) + 1)

    def check(self) -> None:
        n, w = self.num_latent, self.length
        if w < 1:
            raise ValueError(f"a window needs at least one latent chunk, got {w}")
        fits = self.fitting()
        if not fits:
            raise ValueError(
                f"a window of {w} latent chunks does not fit the clip's {n}"
                + (f" from chunk {self.min_start} on" if self.min_start else "")
            )
        if self.start != RANDOM and self.start not in fits:
            raise ValueError(
                f"window [{self.start}, {self.start + w}) does not fit {n} latent chunks "
                f"(allowed starts {fits.start}..{fits.stop - 1})"
            )

    def draw(self, generator: torch.Generator | None = None) -> Window:
        """This step's window: the fixed start, or a uniform draw from `generator` (seeded
        identically on every rank: the window sets how many network calls the step makes)."""
        starts = self.starts()
        if self.start == RANDOM:  # draws even when one start fits: the generator advances alike
            return Window(int(torch.randint(starts.start, starts.stop, (1,), generator=generator).item()), self.length)
        return Window(starts.start, self.length)
