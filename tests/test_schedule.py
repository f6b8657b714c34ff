"""FlowMatchSchedule against diffusers' FlowMatchEulerDiscreteScheduler and hand computations."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mogan_ds.config import load_config
from mogan_ds.sampling.schedule import FlowMatchSchedule

N = 1000


def test_shift_and_sigma_match_diffusers_training_grid():
    for shift in (1.0, 3.0, 8.0):
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
        grid = torch.arange(N, 0, -1, dtype=torch.float32) / N  # diffusers' unshifted 1000..1 / 1000
        ours = FlowMatchSchedule.shift_sigma(grid, shift)
        torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=1e-6)
        # diffusers' timesteps are the *shifted* sigmas * N, so sigma(t) = t / N reads them back
        sched = FlowMatchSchedule(shift=shift)
        torch.testing.assert_close(sched.sigma(ref.timesteps), ref.sigmas, rtol=0, atol=1e-6)
    # hand values: shift 8 at sigma 0.5 is 8*0.5 / (1 + 7*0.5) = 4/4.5
    assert FlowMatchSchedule.shift_sigma(0.5, 8.0) == pytest.approx(4 / 4.5)
    assert FlowMatchSchedule.shift_sigma(0.0, 8.0) == 0.0 and FlowMatchSchedule.shift_sigma(1.0, 8.0) == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("steps", [1, 4, 8, 50])
def test_teacher_grid_matches_set_timesteps(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
    ref.set_timesteps(steps)
    timesteps, sigmas = FlowMatchSchedule(teacher_shift=shift, teacher_steps=steps).teacher_sigmas()
    assert timesteps.shape == (steps,) and sigmas.shape == (steps + 1,)
    torch.testing.assert_close(timesteps, ref.timesteps, rtol=0, atol=2e-4)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=0, atol=2e-7)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_euler_step_matches_diffusers_step():
    torch.manual_seed(0)
    sched = FlowMatchSchedule(teacher_shift=3.0, teacher_steps=6)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0)
    ref.set_timesteps(6)
    timesteps, sigmas = sched.teacher_sigmas()
    x_ref = x = torch.randn(2, 4, 3, 5, 5)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn_like(x)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6)


def test_add_noise_matches_scale_noise():
    torch.manual_seed(1)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0)
    ref.set_timesteps(10)
    sched = FlowMatchSchedule()
    x0, eps = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 3, 4, 4)
    for t in ref.timesteps[[0, 3, 9]]:
        expected = ref.scale_noise(x0, t.reshape(1), eps)
        torch.testing.assert_close(sched.add_noise(x0, eps, sched.sigma(t)), expected, rtol=0, atol=1e-6)


def test_parameterisations_by_hand_and_per_sample_sigma():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.5, 0.02], dtype=torch.float64)
    S = FlowMatchSchedule
    x_t = S.add_noise(x0, eps, sigma)
    for b in range(3):  # per-sample sigma broadcast == one sample at a time, == the formula
        s = float(sigma[b])
        torch.testing.assert_close(x_t[b], (1 - s) * x0[b] + s * eps[b])
    v = eps - x0
    torch.testing.assert_close(S.velocity_target(x0, eps), v)
    torch.testing.assert_close(S.velocity_to_x0(x_t, v, sigma), x0)
    torch.testing.assert_close(S.x0_to_velocity(x_t, x0, sigma), v)
    torch.testing.assert_close(S.x0_to_eps(x_t, x0, sigma), eps)
    # an Euler step from sigma to 0 with the exact velocity lands on x0
    torch.testing.assert_close(x_t + (0 - sigma.view(-1, 1, 1, 1, 1)) * v, x0)
    # half-precision inputs are computed and returned in float32
    out = S.add_noise(x0.bfloat16(), eps.bfloat16(), 0.5)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError):
        S.add_noise(x0, eps, torch.tensor([0.1, 0.2]))  # 2 sigmas for a batch of 3


def test_distilled_timesteps_as_given_match_causvid_fastvideo_lookup():
    sched = FlowMatchSchedule.from_config(load_config("wan2.1-t2v-1.3b"))
    assert not sched.warp_denoising_timesteps
    assert sched.denoising_timesteps().tolist() == [1000.0, 757.0, 522.0]
    torch.testing.assert_close(sched.denoising_sigmas(), torch.tensor([1.0, 0.757, 0.522]))
    # CausVid / FastVideo look sigma up on the shift-8 training grid by nearest timestep;
    # that differs from our exact t/1000 by less than the grid spacing there.
    grid = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=8.0)
    for t, s in zip(sched.denoising_timesteps(), sched.denoising_sigmas()):
        nearest = grid.sigmas[torch.argmin((grid.timesteps - t).abs())]
        assert abs(float(nearest) - float(s)) < 1e-3


def test_warped_distilled_timesteps_match_self_forcing():
    # Self-Forcing: timesteps = cat(scheduler.timesteps, [0])[1000 - denoising_step_list]
    for shift, steps in ((5.0, [1000, 750, 500, 250]), (8.0, [1000, 757, 522])):
        grid = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
        table = torch.cat([grid.timesteps, torch.zeros(1)])
        expected = table[N - torch.tensor(steps)]
        sched = FlowMatchSchedule(shift=shift, denoising_timesteps=steps, warp_denoising_timesteps=True)
        torch.testing.assert_close(sched.denoising_timesteps(), expected, rtol=0, atol=1e-3)
    # hand values (shift 5): sigma' = 5s / (1 + 4s) at s = .75, .5, .25
    sched = FlowMatchSchedule(shift=5.0, denoising_timesteps=[1000, 750, 500, 250], warp_denoising_timesteps=True)
    torch.testing.assert_close(sched.denoising_sigmas(), torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625]))
    cfg = load_config("tiny", ["schedule.warp_denoising_timesteps=true"])
    assert FlowMatchSchedule.from_config(cfg).denoising_timesteps()[1] == pytest.approx(
        1000 * 8 * 0.757 / (1 + 7 * 0.757)
    )


def test_dmd_timestep_draw_by_hand():
    sched = FlowMatchSchedule(shift=8.0, min_timestep=20, max_timestep=980)
    t, sigma = sched.sample_dmd_timestep(4096, torch.Generator().manual_seed(3))
    u = torch.randint(0, N, (4096,), generator=torch.Generator().manual_seed(3)).double()
    expected = (N * 8 * (u / N) / (1 + 7 * (u / N))).clamp(20, 980).float()
    torch.testing.assert_close(t, expected)
    torch.testing.assert_close(sigma, t / N)
    assert t.dtype == torch.float32 and t.shape == (4096,)
    assert t.min() >= 20 and t.max() <= 980
    # shift_sigma(u/N) >= .98  <=>  u >= 1000 * .98 / (8 - 7 * .98) = 859.6: 140 of 1000 integers clamp high,
    # shift_sigma(u/N) < .02  <=>  u < 2.545: u in {0, 1, 2} clamp low
    big, _ = sched.sample_dmd_timestep(50000, torch.Generator().manual_seed(4))
    assert abs((big == 980).float().mean().item() - 0.140) < 0.01
    assert abs((big == 20).float().mean().item() - 0.003) < 0.002
    again, _ = sched.sample_dmd_timestep(4096, torch.Generator().manual_seed(3))
    assert torch.equal(again, t)


class ToyVelocity:
    """v = w * x + t/1000 * cond: elementwise (batch rows independent), one learnable weight."""

    def __init__(self):
        self.w = torch.tensor(0.3, requires_grad=True)
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((t.clone(), torch.is_grad_enabled()))
        return self.w * x + (t / 1000).view(-1, 1, 1, 1, 1) * cond


def _hand_simulation(noise, cond, sched, index, seed, w):
    g = torch.Generator().manual_seed(seed)
    ts = sched.denoising_timesteps()
    x = noise.clone()
    for k in range(index + 1):
        s = ts[k] / 1000
        x0 = x - s * (w * x + s * cond)
        if k < index:
            x = (1 - ts[k + 1] / 1000) * x0 + ts[k + 1] / 1000 * torch.randn(x.shape, generator=g)
    return x0, x


@pytest.mark.parametrize("index", [0, 1, 2])
def test_backward_simulation_trajectory_grad_and_calls(index):
    sched = FlowMatchSchedule()
    noise = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    cond = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    model = ToyVelocity()
    res = sched.backward_simulation(model, noise, cond, index=index, noise_generator=torch.Generator().manual_seed(7))
    assert res.index == index
    # earlier entries without grad, the chosen one with grad, at the distilled timesteps
    assert [g for _, g in model.calls] == [False] * index + [True]
    assert [float(t[0]) for t, _ in model.calls] == [1000.0, 757.0, 522.0][: index + 1]
    assert all(t.shape == (2,) for t, _ in model.calls)
    expected_x0, x_in = _hand_simulation(noise, cond, sched, index, 7, 0.3)
    torch.testing.assert_close(res.x0.detach(), expected_x0, rtol=1e-5, atol=1e-5)
    # grad reaches w only through the last evaluation: d/dw sum(x_in - s*(w x_in + ...)) = -s * sum(x_in)
    res.x0.sum().backward()
    s = [1.0, 0.757, 0.522][index]
    assert model.w.grad.item() == pytest.approx(-s * x_in.sum().item(), rel=1e-4)


def test_backward_simulation_index_draw_is_seeded_and_checked():
    sched = FlowMatchSchedule()
    draws = [sched.draw_index(torch.Generator().manual_seed(s)) for s in range(60)]
    assert set(draws) == {0, 1, 2}
    assert draws == [sched.draw_index(torch.Generator().manual_seed(s)) for s in range(60)]
    noise = torch.randn(1, 16, 1, 2, 2)
    model = ToyVelocity()
    res = sched.backward_simulation(model, noise, torch.zeros_like(noise), generator=torch.Generator().manual_seed(11))
    assert res.index == sched.draw_index(torch.Generator().manual_seed(11)) and len(model.calls) == res.index + 1
    with pytest.raises(ValueError):
        sched.backward_simulation(model, noise, noise, index=3)


def test_backward_simulation_per_sample_generators_are_batch_invariant():
    sched = FlowMatchSchedule()
    noise = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    cond = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    both = sched.backward_simulation(
        ToyVelocity(), noise, cond, index=2, noise_generator=[torch.Generator().manual_seed(s) for s in (1, 2)]
    )
    second = sched.backward_simulation(
        ToyVelocity(), noise[1:], cond[1:], index=2, noise_generator=[torch.Generator().manual_seed(2)]
    )
    torch.testing.assert_close(both.x0[1:], second.x0, rtol=0, atol=0)
    with pytest.raises(ValueError):
        sched.backward_simulation(ToyVelocity(), noise, cond, index=2, noise_generator=[torch.Generator()])


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="denoising_timesteps"):
        FlowMatchSchedule(denoising_timesteps=[522, 757, 1000])
    with pytest.raises(ValueError, match="min_timestep"):
        FlowMatchSchedule(min_timestep=990, max_timestep=980)
