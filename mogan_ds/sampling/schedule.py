"""Flow-matching schedule of Wan2.1: timestep shift, noising, parameterisations, the
distilled generator's timestep list and backward simulation.

Conventions (DESIGN.md, "The training step"; paper section 3.1)
----------------------------------------------------------------
* ``x_t = (1 - s) * x0 + s * eps``, velocity ``v = eps - x0``, ``x0 = x_t - s * v``.
* Every network (generator, teacher, fake score) predicts the velocity and is called with
  the *model timestep* ``t = 1000 * s`` (float, on the 0..``num_train_timesteps`` grid).
  This is what diffusers does: ``FlowMatchEulerDiscreteScheduler.timesteps`` is
  ``sigmas * num_train_timesteps`` *after* the shift. So ``sigma(t) = t / 1000`` always;
  the shift acts when timesteps are *made* (DMD draw, teacher grid, warped distilled
  list), never when they are *read*.
* Wan's shift: ``shift_sigma(s) = shift * s / (1 + (shift - 1) * s)``.

The distilled timestep list (``schedule.denoising_timesteps``)
---------------------------------------------------------------
Public 3-step Wan DMD code uses two conventions, and a checkpoint only works with the one
it was trained with:

* **As given** (``warp_denoising_timesteps=false``, default). CausVid's bidirectional
  recipe (``denoising_step_list: [1000, 757, 522]``, ``timestep_shift: 8``) and FastVideo's
  FastWan (``dmd_denoising_steps='1000,757,522'``, ``flow_shift 8``, no
  ``--warp_denoising_step``) pass the entries to the transformer unchanged and look sigma up
  on the shift-8 1000-step grid by nearest timestep, i.e. ``sigma = t/1000`` up to the
  grid spacing (< 1e-3 here). The shift only shapes the DMD timestep draw. We use
  ``sigma = t/1000`` exactly, so the sigma the latent math uses is the one the model is
  told (``t = 1000*sigma``), with no grid-snapping error.
* **Warped** (``warp_denoising_timesteps=true``). Self-Forcing / LongLive /
  ``--warp_denoising_step`` recipes (``[1000, 750, 500, 250]``, shift 5) treat entry ``k``
  as a position on the shifted grid: ``t' = cat(scheduler.timesteps, [0])[1000 - k]
  = 1000 * shift_sigma(k/1000)``. For ``[1000, 757, 522]`` with shift 8 that would be
  ``[1000, 961.4, 897.3]`` -- not what the public [1000, 757, 522] models were trained on.

The DMD / fake-score timestep follows CausVid/FastVideo: an integer ``u`` uniform in
``[0, num_train_timesteps)``, ``t = 1000 * shift_sigma(u/1000)``, clamped to
``[min_timestep, max_timestep]`` (20, 980); ``sigma = t/1000``.

Precision: latent arithmetic runs in float32 (float64 if an input is float64) whatever the
networks' dtype, and results come back in that dtype -- a bf16 re-noise or ``x_t - s*v``
would keep 8 mantissa bits. ``model_fn`` casts its inputs to the network dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | Sequence[torch.Generator] | None
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""``model_fn(x_t, t, cond) -> velocity``: x_t [B,C,T,H,W], t [B] float on the 0..1000 grid."""


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never a half type)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device | str | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian noise, reproducible across devices and batch compositions.

    diffusers' ``randn_tensor``: a CPU generator draws on the CPU and the result is moved,
    so a seed gives the same noise on CPU and CUDA; a list of generators draws each batch
    row from its own generator (a sample's noise does not depend on its batch neighbours).
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        generator = list(generator)
    return randn_tensor(
        shape, generator=generator, device=torch.device(device) if device is not None else None, dtype=dtype
    )


class SimulationResult(NamedTuple):
    """What `FlowMatchSchedule.backward_simulation` returns."""

    x0: torch.Tensor  # the generator's x0 prediction at the chosen entry (carries grad)
    index: int  # the chosen entry of the distilled list


class FlowMatchSchedule:
    """Wan2.1 flow-matching schedule: see the module docstring for the conventions."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 8.0,
        denoising_timesteps: Sequence[float] = (1000, 757, 522),
        min_timestep: float = 20,
        max_timestep: float = 980,
        teacher_steps: int = 50,
        teacher_shift: float = 3.0,
        warp_denoising_timesteps: bool = False,
        teacher_guidance_scale: float = 5.0,
    ):
        n = int(num_train_timesteps)
        steps = [float(t) for t in denoising_timesteps]
        # The config loader validates these too; a schedule built by hand gets the same checks.
        if n <= 0:
            raise ValueError(f"schedule.num_train_timesteps must be positive, got {n}")
        if shift <= 0 or teacher_shift <= 0:
            raise ValueError(
                f"schedule.shift and schedule.teacher_shift must be positive, got {shift}, {teacher_shift}"
            )
        if (
            not steps
            or any(not 0 < t <= n for t in steps)
            or steps != sorted(steps, reverse=True)
            or len(set(steps)) != len(steps)
        ):
            raise ValueError(
                f"schedule.denoising_timesteps must be distinct, decreasing and in (0, {n}], got {list(denoising_timesteps)}"
            )
        if not 0 <= min_timestep < max_timestep <= n:
            raise ValueError(f"schedule.min_timestep/max_timestep: need 0 <= {min_timestep} < {max_timestep} <= {n}")
        if teacher_steps < 1:
            raise ValueError(f"schedule.teacher_steps must be >= 1, got {teacher_steps}")
        self.num_train_timesteps = n
        self.shift = float(shift)
        self.raw_denoising_timesteps = steps
        self.warp_denoising_timesteps = bool(warp_denoising_timesteps)
        self.min_timestep = float(min_timestep)
        self.max_timestep = float(max_timestep)
        self.teacher_steps = int(teacher_steps)
        self.teacher_shift = float(teacher_shift)
        self.teacher_guidance_scale = float(teacher_guidance_scale)

    @classmethod
    def from_config(cls, cfg) -> FlowMatchSchedule:
        """From a `mogan_ds.config.ScheduleConfig` (or a full `Config`, using its `.schedule`)."""
        s = getattr(cfg, "schedule", cfg)
        return cls(
            num_train_timesteps=s.num_train_timesteps,
            shift=s.shift,
            denoising_timesteps=s.denoising_timesteps,
            min_timestep=s.min_timestep,
            max_timestep=s.max_timestep,
            teacher_steps=s.teacher_steps,
            teacher_shift=s.teacher_shift,
            warp_denoising_timesteps=getattr(s, "warp_denoising_timesteps", False),
            teacher_guidance_scale=getattr(s, "teacher_guidance_scale", 5.0),
        )

    def __repr__(self) -> str:
        return (
            f"FlowMatchSchedule(shift={self.shift}, denoising_timesteps={self.denoising_timesteps().tolist()}, "
            f"dmd_range=[{self.min_timestep}, {self.max_timestep}], teacher={self.teacher_steps} steps @ shift {self.teacher_shift})"
        )

    # ------------------------------------------------------------------ time <-> sigma

    @staticmethod
    def shift_sigma(sigma, shift: float):
        """Wan's timestep shift sigma' = shift*sigma / (1 + (shift-1)*sigma) (floats or tensors).

        Monotone, fixes 0 and 1; shift > 1 moves mass to high noise (video needs it: more
        pixels carry more redundant signal, so the same sigma destroys less information).
        """
        return shift * sigma / (1 + (shift - 1) * sigma)

    def sigma(self, t):
        """Noise level of a model timestep: sigma = t / num_train_timesteps (t already shifted)."""
        if isinstance(t, torch.Tensor):
            t = t.to(compute_dtype(t)) if t.is_floating_point() else t.to(torch.float32)
        return t / self.num_train_timesteps

    def timestep(self, sigma):
        """Model timestep of a noise level: t = sigma * num_train_timesteps."""
        return sigma * self.num_train_timesteps

    # ------------------------------------------------------------------ parameterisations

    @staticmethod
    def _bcast(sigma, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sigma as a tensor broadcastable against `like`: scalar, 0-d, or per-sample [B]."""
        s = torch.as_tensor(sigma, device=like.device).to(dtype)
        if s.ndim == 0:
            return s
        if s.ndim == 1 and s.shape[0] in (1, like.shape[0]):
            return s.reshape(-1, *([1] * (like.ndim - 1)))
        if s.ndim == like.ndim:
            return s
        raise ValueError(f"sigma of shape {tuple(s.shape)} does not broadcast per sample against {tuple(like.shape)}")

    @classmethod
    def add_noise(cls, x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
        """x_t = (1 - sigma) * x0 + sigma * eps (diffusers' `scale_noise`/`add_noise`)."""
        dt = compute_dtype(x0, eps)
        s = cls._bcast(sigma, x0, dt)
        return (1 - s) * x0.to(dt) + s * eps.to(dt)

    @classmethod
    def velocity_to_x0(cls, x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
        """x0 = x_t - sigma * v."""
        dt = compute_dtype(x_t, v)
        return x_t.to(dt) - cls._bcast(sigma, x_t, dt) * v.to(dt)

    @classmethod
    def x0_to_velocity(cls, x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
        """v = eps - x0 = (x_t - x0) / sigma (undefined at sigma = 0, which the schedule never feeds a network)."""
        dt = compute_dtype(x_t, x0)
        return (x_t.to(dt) - x0.to(dt)) / cls._bcast(sigma, x_t, dt)

    @classmethod
    def x0_to_eps(cls, x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
        """eps = (x_t - (1 - sigma) * x0) / sigma."""
        dt = compute_dtype(x_t, x0)
        s = cls._bcast(sigma, x_t, dt)
        return (x_t.to(dt) - (1 - s) * x0.to(dt)) / s

    @staticmethod
    def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The flow-matching regression target v = eps - x0 (the fake score's loss, eq. 3)."""
        dt = compute_dtype(x0, eps)
        return eps.to(dt) - x0.to(dt)

    # ------------------------------------------------------------------ distilled list

    def denoising_timesteps(self, device=None) -> torch.Tensor:
        """The generator's model timesteps [K] (float32), highest first, after the convention.

        Warped entries reproduce Self-Forcing's ``cat(scheduler.timesteps, [0])[1000 - k]`` on
        the shift-warped 1000-step grid, i.e. 1000 * shift_sigma(k / 1000).
        """
        raw = torch.tensor(self.raw_denoising_timesteps, dtype=torch.float64)
        if self.warp_denoising_timesteps:
            raw = self.num_train_timesteps * self.shift_sigma(raw / self.num_train_timesteps, self.shift)
        return raw.to(dtype=torch.float32, device=device)

    def denoising_sigmas(self, device=None) -> torch.Tensor:
        """Noise levels [K] of the distilled list (float32): denoising_timesteps() / 1000."""
        return self.denoising_timesteps(device) / self.num_train_timesteps

    @property
    def num_denoising_steps(self) -> int:
        return len(self.raw_denoising_timesteps)

    # ------------------------------------------------------------------ DMD timestep

    def sample_dmd_timestep(
        self, batch: int, generator: torch.Generator | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] (float32, 0..1000 grid) and sigma [B] for the DMD loss and the fake-score loss.

        u ~ U{0, ..., N-1} (integers, as CausVid/FastVideo draw it), t = N * shift_sigma(u/N),
        clamped to [min_timestep, max_timestep]. One t per sample. The draw happens on the
        generator's device (CPU when none is given), so a seeded CPU generator gives the same
        timesteps on every device.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.randint(0, self.num_train_timesteps, (int(batch),), generator=generator, device=gen_device).to(
            torch.float64
        )
        t = self.num_train_timesteps * self.shift_sigma(u / self.num_train_timesteps, self.shift)
        t = t.clamp(self.min_timestep, self.max_timestep).to(torch.float32)
        if device is not None:
            t = t.to(device)
        return t, t / self.num_train_timesteps

    # ------------------------------------------------------------------ teacher grid

    def teacher_sigmas(
        self, steps: int | None = None, shift: float | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [S], sigmas [S+1]) of the teacher's Euler sampler, float32.

        Exactly ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
        .set_timesteps(S)``: a linspace from N*sigma_max to N*sigma_min where sigma_min is the
        *shifted* last sigma of the training grid (shift(1/N)), divided by N and shifted
        (again), with a terminal 0 appended. The double shift at the low end is diffusers'
        behaviour and is kept so samples match WanPipeline-with-Euler step for step.
        """
        steps = self.teacher_steps if steps is None else int(steps)
        shift = self.teacher_shift if shift is None else float(shift)
        if steps < 1:
            raise ValueError(f"teacher sampler needs >= 1 step, got {steps}")
        n = self.num_train_timesteps
        # diffusers computes the training grid in float32 and stores sigma_min via .item()
        grid_min = torch.tensor(1.0 / n, dtype=torch.float32)
        sigma_min = float(self.shift_sigma(grid_min, shift))
        lin = torch.linspace(n * 1.0, n * sigma_min, steps, dtype=torch.float64) / n  # steps=1: [1.0], as numpy
        sig = self.shift_sigma(lin, shift).to(torch.float32)
        timesteps = sig * n
        sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float32)])
        return timesteps.to(device), sigmas.to(device)

    # ------------------------------------------------------------------ backward simulation

    def draw_index(self, generator: torch.Generator | None = None) -> int:
        """A uniformly drawn entry of the distilled list.

        All data-parallel and sequence-parallel ranks must agree on it (they would otherwise
        run different numbers of generator forwards, and ZeRO-3's collectives would hang):
        seed `generator` identically on every rank (e.g. from the global seed and the step),
        or draw on one rank and broadcast the int, then pass ``index=``.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return int(torch.randint(0, self.num_denoising_steps, (1,), generator=generator, device=gen_device).item())

    def backward_simulation(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        cond: Any,
        index: int | None = None,
        generator: torch.Generator | None = None,
        noise_generator: Generators = None,
    ) -> SimulationResult:
        """The generator's sample at a chosen entry of the distilled list (DMD2 sec. 4.5).

        Entries before `index` run without grad: x0 prediction, then re-noise to the next
        entry's sigma with *fresh* noise (what the few-step sampler does at inference, so the
        training input matches the inference input distribution). Entry `index` runs with
        grad; its x0 prediction is returned. ``index = K-1`` is the full few-step sample.

        index: explicit entry (e.g. broadcast from rank 0); if None it is drawn with
            `generator` (see `draw_index` for why every rank must agree).
        noise_generator: generator(s) for the re-noising noise. Sequence-parallel peers must
            draw the same noise (they hold the same sample), data-parallel ranks different.
        """
        k_total = self.num_denoising_steps
        if index is None:
            index = self.draw_index(generator)
        index = int(index)
        if not 0 <= index < k_total:
            raise ValueError(f"denoising index {index} outside the {k_total}-entry distilled list")
        ts = self.denoising_timesteps(device=noise.device)
        sigmas = ts / self.num_train_timesteps
        batch = noise.shape[0]
        x = noise.to(compute_dtype(noise))
        with torch.no_grad():
            for k in range(index):
                v = model_fn(x, ts[k].expand(batch), cond)
                x0 = self.velocity_to_x0(x, v, sigmas[k])
                eps = randn(x.shape, noise_generator, x.device, x.dtype)
                x = self.add_noise(x0, eps, sigmas[k + 1])
        v = model_fn(x, ts[index].expand(batch), cond)
        return SimulationResult(self.velocity_to_x0(x, v, sigmas[index]), index)
