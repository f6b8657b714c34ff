"""Peak memory per rank of building a Wan DiT: the full way vs partitioned (`models.zero_init`, the ZeRO-3 teacher).

Writes a mid-size WanTransformer3DModel with random weights (save_pretrained, 212M
parameters by default: Wan 1.3B's width, 4 blocks; bf16 file by default) to a temporary folder, then builds the
generator the way the trainer does, in fresh processes started by the real `deepspeed`
launcher (CPU ranks, gloo), at world sizes 1 and 2:

    full       builders.load_transformer (from_pretrained, fp32) on every rank, then
               deepspeed.initialize partitions it (models.zero_init=false)
    zero_init  partitioned.load_partitioned_transformer: zero.Init + the safetensors read
               tensor by tensor into each rank's partitions, then deepspeed.initialize

With ``--role teacher`` the frozen teacher is built instead, in ``models.frozen_dtype`` bf16:

    full       freeze(builders.load_transformer(bf16)): the replica every rank holds when
               parallel.zero_stage.teacher is 1-2 (no engine)
    zero_init  partitioned.load_partitioned_frozen_transformer (fp32-kept modules included),
               then its ZeRO-3 inference engine (engines.teacher_ds_config, no optimizer)

Per rank it records the process's peak private (anonymous) resident memory (`AnonPeak`) and
its ru_maxrss (which also counts the mapped safetensors pages, page cache shared by the
node's ranks); on DeepSpeed's CPU accelerator "device" memory is this same host memory, on
CUDA the accelerator's peak allocation is recorded too. Three points: after imports and the process group (baseline),
after the build, after deepspeed.initialize (ZeRO-3, fp32, AdamW; optimizer moments are
allocated at the first step, so not here). Prints a table and, as its last line, one JSON
object {model_params, model_gib, runs: [{mode, world, rank, base_gib, build_gib, init_gib, ...}]}.

    python benchmarks/zero_init.py [--layers 4] [--heads 12] [--head-dim 128] [--ffn 8960] [--worlds 1 2]
                                   [--save-dtype bf16|fp32] [--role generator|teacher]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class AnonPeak:
    """Peak private (anonymous) resident memory of this process, sampled every `interval` s in a thread.

    ru_maxrss also counts the safetensors files' pages mapped into the process; those are
    page cache, shared by every rank of a node that reads the same file, so the per-rank
    figure that matters is the anonymous part (resident - file-backed/shared, /proc/self/statm).
    """

    def __init__(self, interval: float = 0.002):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self.interval = self.now(), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        with open("/proc/self/statm") as fh:
            _, resident, shared = (int(x) for x in fh.read().split()[:3])
        return (resident - shared) * self.page

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def read(self) -> int:
        self.peak = max(self.peak, self.now())
        return self.peak


def write_model(folder: Path, layers: int, heads: int, head_dim: int, ffn: int, dtype: str = "bf16") -> int:
    """A random-weight Wan DiT (Wan2.1's layout at the given size) saved with save_pretrained; its parameter count."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def worker(args) -> None:
    """One rank: build the DiT one way and record its peak memory (run under the deepspeed launcher)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from mogan_ds.models.builders import load_transformer
    from mogan_ds.models.partitioned import load_partitioned_transformer
    from mogan_ds.parallel import Topology, init_distributed

    torch.set_num_threads(1)
    init_distributed()
    topo = Topology.from_world(1)
    ds = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_cpu.json").read_text())
    ds |= {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
    }
    on_cpu = get_accelerator().device_name() == "cpu"
    if args.role == "teacher":
        from mogan_ds.config import load_config
        from mogan_ds.models.builders import freeze
        from mogan_ds.models.partitioned import load_partitioned_frozen_transformer
        from mogan_ds.train.engines import build_teacher_engine
        from mogan_ds.train.roles import plan_roles

        # The tiny recipe's batch arithmetic (batch 2) at bf16: only precision and ZeRO keys matter here.
        cfg = load_config("tiny", ["models.frozen_dtype=bf16"])
        ds = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_cpu.json").read_text())
    torch.distributed.barrier()
    anon = AnonPeak()
    rec = {"mode": args.mode, "world": topo.world_size, "rank": topo.rank, "base_gib": _peak_bytes() / GIB}
    rec["anon_base_gib"] = anon.read() / GIB
    t0 = time.perf_counter()
    if args.role == "teacher" and args.mode == "full":
        model = freeze(load_transformer(args.model, torch.bfloat16), torch.device(get_accelerator().device_name()))
    elif args.role == "teacher":
        model = load_partitioned_frozen_transformer(args.model, plan_roles(cfg, ds, topo)["teacher"].ds_config, topo)
    elif args.mode == "full":
        model = load_transformer(args.model, torch.float32)
    else:
        model = load_partitioned_transformer(args.model, ds, topo)
    rec["build_s"] = time.perf_counter() - t0
    rec["build_gib"] = _peak_bytes() / GIB
    rec["anon_build_gib"] = anon.read() / GIB
    if args.role == "teacher":
        # A replica has no engine; the partitioned teacher gets its inference engine.
        module = (
            model
            if args.mode == "full"
            else build_teacher_engine(model, plan_roles(cfg, ds, topo)["teacher"], topo).module
        )
    else:
        module = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds, mpu=topo)[0].module
    rec["init_gib"] = _peak_bytes() / GIB
    rec["anon_init_gib"] = anon.read() / GIB
    rec["partition_numel"] = sum(getattr(p, "ds_tensor", p).numel() for p in module.parameters())
    if not on_cpu:
        rec["device_peak_gib"] = get_accelerator().max_memory_allocated() / GIB
    out = [None] * topo.world_size
    torch.distributed.all_gather_object(out, rec)
    if topo.rank == 0:
        Path(args.out).write_text(json.dumps(out))


def launch(mode: str, world: int, model: Path, out: Path, role: str = "generator") -> list[dict]:
    from mogan_ds.cli.launcher import deepspeed_command, launch_env

    cmd = deepspeed_command(
        world, __file__, ["--worker", "--mode", mode, "--role", role, "--model", str(model), "--out", str(out)]
    )
    proc = subprocess.run(
        cmd, env=launch_env({"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}), capture_output=True, text=True
    )
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--save-dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="dtype of the written checkpoint; both ways build fp32 trainable weights from it",
    )
    ap.add_argument(
        "--role",
        choices=["generator", "teacher"],
        default="generator",
        help="generator: fp32 trainable weights + AdamW engine; teacher: the frozen bf16 teacher, replica vs ZeRO-3",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["full", "zero_init"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="zero_init_bench_") as tmp:
        tmp = Path(tmp)
        # In a child process: the parent's own memory is not what is measured, but keep it small.
        repo, dit = str(Path(__file__).resolve().parents[1]), str(tmp / "dit")
        code = (
            f"import sys, pathlib; sys.path.insert(0, {repo!r}); from benchmarks.zero_init import write_model; "
            f"print(write_model(pathlib.Path({dit!r}), {args.layers}, {args.heads}, {args.head_dim}, {args.ffn}, {args.save_dtype!r}))"
        )
        n_params = int(
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1]
        )
        built = "bf16" if args.role == "teacher" else "fp32"
        model_gib = n_params * (2 if args.role == "teacher" else 4) / GIB
        print(
            f"Wan DiT ({args.role}): {args.layers} blocks, dim {args.heads * args.head_dim}, ffn {args.ffn}: "
            f"{n_params / 1e6:.0f}M parameters = {model_gib:.2f} GiB {built}, saved as {args.save_dtype}",
            flush=True,
        )
        runs = []
        for world in args.worlds:
            for mode in ("full", "zero_init"):
                runs += launch(mode, world, tmp / "dit", tmp / f"{mode}_{world}.json", args.role)
    for key, title in (("anon", "private (anonymous) memory"), ("", "ru_maxrss, incl. mapped safetensors pages")):
        pre = f"{key}_" if key else ""
        print(f"\npeak {title} above the process's baseline, GiB per rank")
        print(
            f"{'world':>5} {'rank':>4} | build: {'full':>6} {'zero_init':>9} | +initialize: {'full':>6} {'zero_init':>9}"
        )
        for world in args.worlds:
            for rank in range(world):
                r = {
                    m: next(x for x in runs if x["mode"] == m and x["world"] == world and x["rank"] == rank)
                    for m in ("full", "zero_init")
                }
                d = {m: {p: r[m][f"{pre}{p}_gib"] - r[m][f"{pre}base_gib"] for p in ("build", "init")} for m in r}
                print(
                    f"{world:>5} {rank:>4} |        {d['full']['build']:>6.2f} {d['zero_init']['build']:>9.2f} |"
                    f"              {d['full']['init']:>6.2f} {d['zero_init']['init']:>9.2f}"
                )
    print(
        json.dumps(
            {
                "role": args.role,
                "model_params": n_params,
                "model_gib": round(model_gib, 3),
                "save_dtype": args.save_dtype,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
