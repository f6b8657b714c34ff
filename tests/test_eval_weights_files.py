"""Weights files as their publishers write them, and wrong ones: every loader reads weights-only.

amt-s.pth is what AMT's own trainer saves: ``{epoch, state_dict, optim}``, with the
``numpy.float64`` learning rate its cosine schedule leaves in the optimizer state (torch's
plain weights-only load refuses that file). A file that is not what a flag expects ends
in one stderr line naming the file and what was expected, exit code 2 (the four cases
through launch/evaluate.py's main in-process, one of them through the script itself).
"""

import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.optical_flow import raft_large, raft_small

from mogan_ds.errors import BadFileError
from mogan_ds.eval.amt import AMTS, load_amt_s
from mogan_ds.eval.raft_keys import load_raft_checkpoint, torchvision_to_original
from mogan_ds.models.builders import load_raft
from mogan_ds.models.weights_files import load_weights_file

REPO = Path(__file__).resolve().parents[1]


def _amt_trainer_checkpoint(path: Path, numpy_module: str = "numpy._core") -> dict:
    """AMT-S saved as AMT's trainer saves it; `numpy_module` is the scalar's module as numpy 2 or 1.x writes it."""
    torch.manual_seed(0)
    model = AMTS()
    optim = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optim.step()  # Adam's moments and step counts in the state
    lr_min, lr_max, progress = 2e-5, 2e-4, 0.3
    for group in optim.param_groups:  # AMT's cosine schedule: a numpy.float64
        group["lr"] = lr_min + (lr_max - lr_min) * (1 + np.cos(np.pi * progress)) / 2
    assert type(optim.param_groups[0]["lr"]) is np.float64
    ckpt = {"epoch": 299, "state_dict": model.state_dict(), "optim": optim.state_dict()}
    torch.save(ckpt, path)
    if numpy_module != "numpy._core":
        _rename_pickled_global(
            path, b"numpy._core.multiarray\nscalar\n", f"{numpy_module}.multiarray\nscalar\n".encode()
        )
    return ckpt


def _rename_pickled_global(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite a GLOBAL's module in a torch zip file (as an older numpy would have named it)."""
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            z.writestr(info, data)


@pytest.mark.parametrize("numpy_module", ["numpy._core", "numpy.core"], ids=["numpy2-written", "numpy1-written"])
def test_amt_s_loads_as_its_trainer_saves_it(tmp_path, numpy_module):
    path = tmp_path / "amt-s.pth"
    ckpt = _amt_trainer_checkpoint(path, numpy_module)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert f"{numpy_module}.multiarray.scalar" in unsafe  # the trap: a plain weights-only load refuses it
    with pytest.raises(Exception, match="scalar"):
        torch.load(path, map_location="cpu", weights_only=True)
    allowed_before = set(torch.serialization.get_safe_globals())
    model = load_amt_s(path)
    assert not model.training
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in model.state_dict().items())
    assert set(torch.serialization.get_safe_globals()) == allowed_before  # allowed for that one load only
    data = load_weights_file(path, "an AMT-S checkpoint")
    lr = data["optim"]["param_groups"][0]["lr"]
    assert type(lr) is np.float64 and lr == ckpt["optim"]["param_groups"][0]["lr"]


class _RunsCode:
    """Pickles as a call of `open(marker, "w")`: a full unpickle would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_only_weights_and_numpy_numbers_are_read(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _RunsCode(marker)}, tmp_path / "code.pth")
    with pytest.raises(BadFileError, match="code.pth: not a thing: .*weights-only load refuses"):
        load_weights_file(tmp_path / "code.pth", "a thing")
    assert not marker.exists()
    # numpy numbers only: arrays and string scalars stay refused
    for name, value in (("array", np.zeros(3)), ("str", np.str_("x"))):
        torch.save({"w": torch.zeros(1), "x": value}, tmp_path / f"{name}.pth")
        with pytest.raises(BadFileError, match=f"{name}.pth: not a thing: torch cannot read it as weights"):
            load_weights_file(tmp_path / f"{name}.pth", "a thing")
    numbers = {"i64": np.int64(-2), "f32": np.float32(0.5), "f16": np.float16(2), "bool": np.bool_(True)}
    numbers |= {"u8": np.uint8(7), "c128": np.complex128(1j)}
    torch.save({"w": torch.zeros(1), **numbers}, tmp_path / "numbers.pth")
    got = load_weights_file(tmp_path / "numbers.pth", "a thing")
    assert all(type(got[k]) is type(v) and got[k] == v for k, v in numbers.items())


def _with_numpy_numbers(sd: dict) -> dict:
    return {"epoch": np.int64(3), "lr": np.float64(1e-4), "state_dict": sd}


def test_every_eval_and_training_loader_reads_the_same_way(tmp_path):
    """RAFT as princeton-vl and torchvision publish it, in a trainer's layout too; the training RAFT."""
    tv = raft_large(weights=None).state_dict()
    torch.save({"module." + k: v for k, v in torchvision_to_original(tv).items()}, tmp_path / "raft-things.pth")
    torch.save(tv, tmp_path / "raft_large.pth")
    torch.save(_with_numpy_numbers(tv), tmp_path / "raft_in_trainer_layout.pth")
    for name in ("raft-things.pth", "raft_large.pth", "raft_in_trainer_layout.pth"):
        assert not load_raft_checkpoint(tmp_path / name).training
    torch.save(_with_numpy_numbers(raft_small(weights=None).state_dict()), tmp_path / "raft_small.pth")
    assert not load_raft(tmp_path / "raft_small.pth", "raft_small").training
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    with pytest.raises(BadFileError, match="text.pth: not a torchvision raft_small state dict"):
        load_raft(tmp_path / "text.pth", "raft_small")


def test_quality_heads_are_read_weights_only(tmp_path):
    """The LAION head and MUSIQ (pyiqa's own loader would unpickle the file in full)."""
    from transformers import CLIPConfig, CLIPModel

    from mogan_ds.eval.quality import AestheticQuality

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=32)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path / "clip")
    head = torch.nn.Linear(8, 1)
    torch.save(_with_numpy_numbers(head.state_dict()), tmp_path / "aes.pth")
    got = AestheticQuality(tmp_path / "clip", tmp_path / "aes.pth").mlp
    assert torch.equal(got.weight, head.weight)
    marker = tmp_path / "ran"
    torch.save({"weight": torch.zeros(1, 8), "bias": _RunsCode(marker)}, tmp_path / "code.pth")
    with pytest.raises(BadFileError, match="code.pth: not an aesthetic predictor"):
        AestheticQuality(tmp_path / "clip", tmp_path / "code.pth")
    musiq_arch = pytest.importorskip("pyiqa.archs.musiq_arch", reason="pyiqa is in the dev extra")
    from mogan_ds.eval.quality import ImagingQuality

    with pytest.raises(BadFileError, match="code.pth: not a MUSIQ checkpoint"):
        ImagingQuality(tmp_path / "code.pth")
    assert not marker.exists()
    net = musiq_arch.MUSIQ(pretrained=False)
    torch.save(_with_numpy_numbers({"module." + k: v for k, v in net.state_dict().items()}), tmp_path / "musiq.pth")
    assert torch.equal(ImagingQuality(tmp_path / "musiq.pth").model.head.weight, net.head.weight)


# --------------------------------------------------------------------------- launch/evaluate.py


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("wrong_files")
    torch.save(torchvision_to_original(raft_large(weights=None).state_dict()), d / "raft-things.pth")
    _amt_trainer_checkpoint(d / "amt-s.pth")
    (d / "notes.txt").write_text("these are not weights\n")
    (d / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    gen = d / "generator"  # enough for the evaluator to reach its metrics (nothing is sampled before them)
    gen.mkdir()
    (gen / "config.json").write_text("{}")
    (gen / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (d / "prompts.txt").write_text("a cat jumps\n")
    return d


WRONG = [
    # (flag, file, what the one line must say)
    ("--amt", "raft-things.pth", "not an AMT-S checkpoint (amt-s.pth): missing keys feat_encoder."),
    ("--amt", "notes.txt", "not an AMT-S checkpoint (amt-s.pth): torch cannot read it as weights"),
    ("--raft", "amt-s.pth", "not a RAFT checkpoint (VBench's raft-things.pth or a torchvision raft_large"),
    ("--raft", "random.bin", "not a RAFT checkpoint (VBench's raft-things.pth or a torchvision raft_large"),
]


def _evaluate_args(d: Path, out: Path, flag: str, name: str) -> list[str]:
    return ["--config", "tiny", "--prompts", str(d / "prompts.txt"), "--model", f"g={d / 'generator'}",
            "--no-progress", "--out", str(out), flag, str(d / name)]  # fmt: skip


@pytest.mark.parametrize("flag, name, says", WRONG, ids=[f"{f} {n}" for f, n, _ in WRONG])
def test_evaluate_with_a_wrong_weights_file_is_one_line_exit_2(wrong_files, tmp_path, capsys, flag, name, says):
    # launch/evaluate.py's main in this process (fast); the next test runs the script itself.
    main = runpy.run_path(str(REPO / "launch" / "evaluate.py"), run_name="mogan_test_evaluate_py")["main"]
    code = main(_evaluate_args(wrong_files, tmp_path / "out", flag, name))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"evaluate.py: error: {wrong_files / name}: {says}"), lines[0]


def test_evaluate_script_exits_2_on_a_wrong_weights_file(wrong_files, tmp_path):
    from mogan_ds.cli.launcher import launch_env

    flag, name, says = WRONG[0]
    argv = [sys.executable, str(REPO / "launch" / "evaluate.py"), *_evaluate_args(wrong_files, tmp_path, flag, name)]
    r = subprocess.run(argv, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"evaluate.py: error: {wrong_files / name}: {says}"), lines[0]
