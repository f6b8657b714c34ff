"""Part d: the Wan2.1 1.3B DiT alone at the paper's shape, forward + backward per attention backend."""

from __future__ import annotations

import time
from pathlib import Path

from .common import PART_NAMES, Mode, Report, read_json, round_sig, sync, to_gib

CUDA_BACKENDS = ("native", "_native_flash", "_native_cudnn", "_native_efficient", "flash", "_flash_3")
CPU_BACKENDS = ("native", "_native_flash", "_native_math")


def part_d(rep: Report, mode: Mode, args) -> None:
    import torch
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from mogan_ds.config import load_config
    from mogan_ds.models.presets import PRESETS
    from mogan_ds.motion.latents import latent_shape
    from mogan_ds.plan.flops import count_flops

    cfg = load_config(mode.paper_recipe, [])
    tcfg = PRESETS[cfg.models.arch]["transformer"]
    dev, dtype = torch.device(mode.device), torch.bfloat16
    torch.manual_seed(0)
    with dev:
        model = WanTransformer3DModel(**tcfg)
    model.to(dtype).train()
    model.enable_gradient_checkpointing()
    shape = latent_shape(cfg.video, 1)
    x = torch.randn(shape, device=dev, dtype=dtype)
    t = torch.tensor([500.0], device=dev)
    ctx = torch.randn(1, cfg.text.max_length, tcfg["text_dim"], device=dev, dtype=dtype)
    p = tcfg["patch_size"]
    tokens = shape[2] // p[0] * (shape[3] // p[1]) * (shape[4] // p[2])
    rep.update(
        recipe=mode.paper_recipe,
        params=sum(q.numel() for q in model.parameters()),
        latents=list(shape),
        tokens=tokens,
        text_tokens=cfg.text.max_length,
        dtype="bfloat16",
        gradient_checkpointing=True,
        iterations=mode.dit_iters,
        flops_note="FlopCounterMode over one forward + backward, recomputation of the checkpointed blocks included",
    )

    def step():
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def count_warmup(fn) -> int:
        """The warm-up step, its FLOPs counted: by network as the planner counts, else torch's plain counter."""
        try:
            return count_flops(fn, {model: "dit"})[1].total
        except Exception:  # noqa: BLE001 - count_flops seeds a private map of FlopCounterMode's module tracker
            model.zero_grad(set_to_none=True)
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            return counter.get_total_flops()

    results = {}
    for name in CUDA_BACKENDS if dev.type == "cuda" else CPU_BACKENDS:
        try:
            model.set_attention_backend(name)
        except Exception as e:  # noqa: BLE001 - a backend whose package is missing is reported, not fatal
            results[name] = {"status": "unavailable", "error": str(e)[:300]}
            rep.update(backends=results)
            continue
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            flops = count_warmup(step)
            sync(dev)
            times = []
            for _ in range(mode.dit_iters):
                t0 = time.perf_counter()
                if dev.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    step()
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) / 1e3)
                else:
                    step()
                    times.append(time.perf_counter() - t0)
            sec = sorted(times)[len(times) // 2]
            results[name] = {
                "status": "ok",
                "time_s": round(sec, 4),
                "times_s": [round(v, 4) for v in times],
                "flops": flops,
                "tflops": round_sig(flops / sec / 1e12),
                "peak_mem_gib": to_gib(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None,
            }
        except torch.OutOfMemoryError as e:
            results[name] = {"status": "oom", "error": str(e)[:300]}
        except Exception as e:  # noqa: BLE001 - e.g. a forced SDPA kernel that does not support the shape
            results[name] = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rep.update(backends=results)
    ok = {k: v for k, v in results.items() if v["status"] == "ok"}
    if ok:
        # The same maths whichever kernel: where a kernel's FLOP formula is missing its count is low.
        work = max(v["flops"] for v in ok.values())
        for v in ok.values():
            v["tflops_at_max_count"] = round_sig(work / v["time_s"] / 1e12)
        ceiling = ((read_json(Path(args.out) / f"{PART_NAMES['a']}.json") or {}).get("matmul") or {}).get("tflops")
        for v in ok.values():
            v["mfu_vs_measured_ceiling"] = round_sig(v["tflops_at_max_count"] / ceiling) if ceiling else "n/a"
        best = max(ok, key=lambda k: ok[k]["tflops_at_max_count"])
        rep.update(backends=results, flops=work, fastest=best, ceiling_tflops=ceiling, status="ok")
    else:
        rep.update(status="failed", error="no attention backend ran")
