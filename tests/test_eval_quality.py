"""VBench's imaging-quality column (MUSIQ through pyiqa) against a hand computation.

pyiqa is in the dev extra, so this runs in CI; MUSIQ's SPAQ checkpoint cannot be
downloaded here, so a randomly initialised MUSIQ written in pyiqa's checkpoint layout
stands in for it: what is checked is the path (loading, VBench's resize, /255, per-frame
score, mean, /100, the weights label), which does not depend on the weights' values.
"""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mogan_ds.eval.metrics import EvalWeights, VideoMetrics

pyiqa_musiq = pytest.importorskip("pyiqa.archs.musiq_arch", reason="pyiqa is in the dev extra")


@pytest.fixture(scope="module")
def musiq_file(tmp_path_factory):
    torch.manual_seed(0)
    net = pyiqa_musiq.MUSIQ(pretrained=False)  # num_class 1, as the SPAQ checkpoint VBench uses
    path = tmp_path_factory.mktemp("musiq") / "musiq_spaq_ckpt-test.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # DataParallel prefix, as released
    return path, net.eval()


def _by_hand(net, frames: np.ndarray) -> float:
    """VBench imaging_quality.technical_quality, written out: longer side to <= 512 with a plain
    (non-antialiased) bilinear resize, /255, MUSIQ per frame, mean over frames, /100."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if max(h, w) > 512:
        s = 512 / max(h, w)
        x = F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False, antialias=False)
    with torch.no_grad():
        scores = [float(net(f[None] / 255.0)) for f in x]
    return sum(scores) / len(scores) / 100.0


@pytest.mark.parametrize("size", [(600, 800), (256, 320)], ids=["resized-to-384x512", "kept"])
def test_imaging_quality_equals_vbench_rule(musiq_file, size):
    path, net = musiq_file
    m = VideoMetrics.from_weights(EvalWeights(musiq=str(path)), log=lambda s: None)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert m.weights["imaging_quality"] == f"{path.name} (sha256 {sha})"
    frames = np.random.default_rng(1).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    got = m.video(frames, 8)["imaging_quality"]
    assert got == pytest.approx(_by_hand(net, frames), rel=1e-5, abs=1e-7)
    # The score depends on the frames (a column that ignored its input would pass the equality).
    assert got != pytest.approx(m.video(frames[:, ::-1].copy(), 8)["imaging_quality"], rel=1e-6, abs=1e-9)


def test_a_file_that_is_not_musiq_is_refused_by_name(tmp_path):
    bad = tmp_path / "not-musiq.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not-musiq.pth: not a MUSIQ checkpoint"):
        VideoMetrics.from_weights(EvalWeights(musiq=str(bad)), log=lambda s: None)
