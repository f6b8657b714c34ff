"""VBench's metric rules on clips of known motion, and the evaluation networks' weight layouts."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures.standins import average_interpolator, phase_correlation_flow, textured_clip
from torchvision.models.optical_flow import raft_large

from mogan_ds.errors import BadFileError
from mogan_ds.eval import dynamic_degree as dd
from mogan_ds.eval import motion_smoothness as ms
from mogan_ds.eval.amt import AMTS, load_amt_s
from mogan_ds.eval.metrics import EvalWeights, VideoMetrics, motion_score, summarize
from mogan_ds.eval.raft_keys import load_raft_checkpoint, original_to_torchvision, torchvision_to_original
from mogan_ds.eval.report import results_markdown
from mogan_ds.eval.weights import NOT_GIVEN, describe_weights

FIXTURES = Path(__file__).parent / "eval_fixtures"


def _layout(name):
    return {k: tuple(v) for k, v in json.loads((FIXTURES / name).read_text())["keys"].items()}


def _random_state(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.1
    return sd


# ----------------------------------------------------------------------------- RAFT key mapping


def test_raft_original_layout_loads_into_torchvision_with_every_tensor_in_place():
    layout = _layout("raft_things_layout.json")
    orig = _random_state(layout)
    # The original's strided residual blocks hold one BatchNorm under two names.
    for k in list(orig):
        if ".norm3." in k:
            orig[k] = orig[k.replace(".norm3.", ".downsample.1.")]
    mapped = original_to_torchvision({"module." + k: v for k, v in orig.items()})
    model = raft_large(weights=None)
    model.load_state_dict(mapped, strict=True)
    tv = model.state_dict()
    # Every original tensor (norm3 aliases aside) lands on exactly one torchvision key, same values.
    assert len(mapped) == len([k for k in orig if ".norm3." not in k]) == len(tv)
    for k, v in orig.items():
        if ".norm3." in k:
            continue
        matches = [tk for tk, tv_v in mapped.items() if tv_v is v]
        assert len(matches) == 1, k
        assert torch.equal(tv[matches[0]], v)
    # Two keys the mapping must not confuse, checked by name.
    assert torch.equal(tv["update_block.recurrent_block.convgru2.convq.weight"], orig["update_block.gru.convq2.weight"])
    assert torch.equal(tv["mask_predictor.conv.weight"], orig["update_block.mask.2.weight"])


def test_raft_round_trip_gives_the_same_flow():
    torch.manual_seed(0)
    src = raft_large(weights=None).eval()
    for m in src.modules():  # non-trivial BatchNorm statistics, so a misplaced buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    orig = torchvision_to_original(src.state_dict())
    layout = _layout("raft_things_layout.json")
    assert {k: tuple(v.shape) for k, v in orig.items()} == layout  # the inverse produces the real layout
    dst = raft_large(weights=None)
    dst.load_state_dict(original_to_torchvision(orig), strict=True)
    dst.eval()
    a = torch.rand(1, 3, 128, 128) * 2 - 1
    b = torch.roll(a, 3, -1)
    with torch.no_grad():
        f_src = src(a, b, num_flow_updates=2)[-1]
        f_dst = dst(a, b, num_flow_updates=2)[-1]
    assert f_src.abs().mean() > 0
    torch.testing.assert_close(f_dst, f_src, rtol=0, atol=0)


def test_load_raft_checkpoint_module_prefix_and_old_batchnorm(tmp_path):
    orig = torchvision_to_original(raft_large(weights=None).state_dict())
    sd = {"module." + k: v for k, v in orig.items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "raft-things.pth")
    model = load_raft_checkpoint(tmp_path / "raft-things.pth")
    assert not model.training
    bad = dict(sd)
    bad["module.fnet.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unknown keys"):
        load_raft_checkpoint(tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- dynamics degree rule


def test_dynamic_rule_parameters_and_boundary():
    assert dd.dynamic_params(256, 448, 16) == (6.0, 4)
    assert dd.dynamic_params(480, 832, 25) == (6.0 * 480 / 256, 6)  # 49 frames at 16 fps -> 25 sampled
    assert [dd.frame_interval(f) for f in (8, 16, 24, 20, 4)] == [1, 2, 3, 2, 1]  # round half to even, as VBench
    thr, need = 6.0, 4
    assert not dd.is_dynamic([6.0] * 10, thr, need)  # strictly above the threshold
    assert dd.is_dynamic([6.0 + 1e-6] * 4, thr, need)
    assert not dd.is_dynamic([7.0, 7.0, 7.0, 1.0, 1.0], thr, need)  # three pairs are not enough
    assert dd.is_dynamic([1.0, 7.0, 1.0, 7.0, 7.0, 1.0, 7.0], thr, need)  # need not be consecutive
    assert dd.is_dynamic([0.0], thr, 0) and not dd.is_dynamic([], thr, 0)


def test_top5_mean_magnitude():
    flow = torch.zeros(2, 20, 20)  # 400 pixels: the top 5% is 20 of them
    flow[0, 0, :] = 6.0
    flow[1, 0, :] = 8.0  # 20 pixels of magnitude 10
    flow[0, 1, :10] = 3.0  # next largest: must stay outside the top 20
    assert dd.top5_mean_magnitude(flow) == pytest.approx(10.0)
    flow[0, 0, :2] = 0.0
    flow[1, 0, :2] = 0.0  # now 18 tens and two threes
    assert dd.top5_mean_magnitude(flow) == pytest.approx((18 * 10 + 2 * 3) / 20)


def test_static_clip_is_not_dynamic_and_fast_one_is():
    metric = dd.DynamicDegree(phase_correlation_flow)
    static = np.repeat(textured_clip(1, 64, 0), 16, axis=0)
    fast = textured_clip(16, 64, step=4)  # threshold 6 * 64/256 = 1.5 px
    slow = textured_clip(16, 64, step=1)
    r_static, r_fast, r_slow = metric.video(static, 8), metric.video(fast, 8), metric.video(slow, 8)
    assert not r_static.dynamic and max(r_static.pair_scores) == 0
    assert r_fast.dynamic and r_fast.pair_scores == [4.0] * 15
    assert not r_slow.dynamic and r_slow.count_num == 4
    # At 16 fps every 2nd frame is used: the 1 px/frame clip moves 2 px per used pair and is dynamic.
    r16 = metric.video(slow, 16)
    assert r16.num_frames == 8 and r16.count_num == 2 and r16.dynamic and r16.pair_scores == [2.0] * 7
    assert dd.dynamic_degree([r_static.dynamic, r_fast.dynamic, r_slow.dynamic, r16.dynamic]) == 0.5


def test_a_clip_without_frames_is_refused_and_one_frame_is_not_dynamic():
    calls = []

    def flow_fn(a, b):
        calls.append(a.shape)
        return torch.zeros(a.shape[0], 2, *a.shape[2:])

    metric = dd.DynamicDegree(flow_fn)
    with pytest.raises(ValueError, match=r"needs frames \[T >= 1, H, W, 3\], got shape \(0, 16, 16, 3\)"):
        metric.video(np.zeros((0, 16, 16, 3), np.uint8), 8)
    one = metric.video(np.zeros((1, 16, 16, 3), np.uint8), 8)  # as VBench: no pairs, count_num 0, not dynamic
    assert not one.dynamic and one.pair_scores == [] and one.count_num == 0 and one.num_frames == 1
    assert calls == []


def test_frames_are_padded_to_multiples_of_8_as_raft_input_padder():
    seen = []

    def flow_fn(a, b):
        seen.append(a.shape)
        return torch.zeros(a.shape[0], 2, *a.shape[2:])

    dd.DynamicDegree(flow_fn).video(np.zeros((3, 60, 70, 3), np.uint8), 8)
    assert seen[0][-2:] == (64, 72)
    assert dd.sintel_padding(60, 70) == [1, 1, 2, 2]


# ----------------------------------------------------------------------------- motion smoothness rule


def _crossfade(n=9, size=32, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.random((size, size, 3)) * 255, rng.random((size, size, 3)) * 255
    t = np.linspace(0, 1, n)[:, None, None, None]
    return ((1 - t) * a + t * b).round().astype(np.uint8)


def test_linear_crossfade_is_interpolated_well_and_shuffling_lowers_smoothness():
    clip = _crossfade()
    rule = ms.MotionSmoothness(average_interpolator)
    # Rounding of the clip and the truncation of tensor2img leave at most ~1 level of error.
    assert rule.video(clip) > 1 - 1.5 / 255
    shuffled = clip[np.random.default_rng(1).permutation(len(clip))]
    assert rule.video(shuffled) < rule.video(clip) - 0.01


def test_smoothness_uses_odd_frames_and_truncates_like_tensor2img():
    assert ms.tensor_to_uint8(torch.full((3, 1, 1), 0.999))[0, 0, 0] == 254
    clip = np.zeros((5, 16, 16, 3), np.uint8)
    clip[1] = 51  # the interpolator sees frames 0, 2, 4 (all 0): frame 1 is off by 51
    score = ms.MotionSmoothness(average_interpolator).video(clip)
    assert score == pytest.approx((255 - 51 / 2) / 255)  # mean over the two interpolated frames


# ----------------------------------------------------------------------------- AMT-S network


def test_amt_s_loads_the_public_layout_strictly(tmp_path):
    layout = _layout("amt_s_layout.json")
    assert {k: tuple(v.shape) for k, v in AMTS().state_dict().items()} == layout
    sd = _random_state(layout)
    torch.save({"state_dict": sd}, tmp_path / "amt-s.pth")
    model = load_amt_s(tmp_path / "amt-s.pth")
    assert torch.equal(model.state_dict()["decoder1.convblock.2.weight"], sd["decoder1.convblock.2.weight"])
    del sd["comb_block.2.bias"]
    torch.save({"state_dict": sd}, tmp_path / "short.pth")
    with pytest.raises(BadFileError, match="short.pth: not an AMT-S checkpoint .*missing keys comb_block.2.bias"):
        load_amt_s(tmp_path / "short.pth")


def test_amt_s_forward_and_identity_on_a_flat_clip():
    torch.manual_seed(0)
    model = AMTS().eval()
    a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = model(a, b, torch.full((1, 1, 1, 1), 0.5))
    assert out.shape == a.shape and out.min() >= 0 and out.max() <= 1
    # With the residual heads zeroed the output is the blend of both warped frames plus
    # their mean: a flat clip is reproduced exactly whatever the flows are.
    with torch.no_grad():
        model.decoder1.convblock[2].weight.zero_()
        model.decoder1.convblock[2].bias.zero_()
        model.comb_block[2].weight.zero_()
        model.comb_block[2].bias.zero_()
    flat = np.full((5, 128, 128, 3), 128, np.uint8)
    score = ms.MotionSmoothness(ms.amt_interpolator(model)).video(flat)
    assert score >= 1 - 1 / 255  # tensor2img's truncation may cost one level


# ----------------------------------------------------------------------------- bundle, weights, n/a


def test_missing_weights_make_columns_na_with_a_message(tmp_path):
    messages = []
    m = VideoMetrics.from_weights(EvalWeights(raft=str(tmp_path / "nope.pth")), log=messages.append)
    assert m.dynamic is None and m.smoothness is None and m.aesthetic is None and m.imaging is None
    assert all(m.weights[c] == NOT_GIVEN for c in m.weights)
    assert any("nope.pth" in s and "--raft" in s for s in messages)
    assert any("--amt" in s and NOT_GIVEN in s for s in messages)
    rec = m.video(np.zeros((5, 16, 16, 3), np.uint8), 8)
    row = summarize("x", [rec], m.weights)
    assert row["motion_smoothness"] is None and row["motion_score"] is None and row["num_videos"] == 1
    md = results_markdown([row])
    assert "| x | 1 | n/a | n/a | n/a | n/a | n/a |" in md and NOT_GIVEN in md


def test_weights_are_named_by_file_and_sha256(tmp_path):
    amt = AMTS()
    torch.save({"state_dict": amt.state_dict()}, tmp_path / "amt-s.pth")
    sha = hashlib.sha256((tmp_path / "amt-s.pth").read_bytes()).hexdigest()
    assert describe_weights(tmp_path / "amt-s.pth").label == f"amt-s.pth (sha256 {sha[:12]})"
    m = VideoMetrics.from_weights(EvalWeights(amt=str(tmp_path / "amt-s.pth")), log=lambda s: None)
    assert m.weights["motion_smoothness"] == f"amt-s.pth (sha256 {sha[:12]})"
    assert m.weights["motion_score"] == NOT_GIVEN  # needs the dynamics degree too
    assert motion_score(0.98, 0.5) == pytest.approx(0.74)


def test_aesthetic_quality_on_a_tiny_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=8,
    )
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(tmp_path / "clip")
    head = torch.nn.Linear(8, 1)
    torch.save(head.state_dict(), tmp_path / "aes.pth")
    m = VideoMetrics.from_weights(
        EvalWeights(clip=str(tmp_path / "clip"), aesthetic=str(tmp_path / "aes.pth")), log=lambda s: None
    )
    assert (
        m.weights["aesthetic_quality"].startswith("clip/ (sha256 ")
        and " + aes.pth (sha256 " in m.weights["aesthetic_quality"]
    )
    frames = np.random.default_rng(0).integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    got = m.video(frames, 8)["aesthetic_quality"]
    # By hand: VBench's transform, the normalised image embedding, the head, /10, mean over frames.
    from mogan_ds.eval.quality import clip_transform

    x = clip_transform(torch.from_numpy(frames).permute(0, 3, 1, 2).float())
    assert x.shape == (3, 3, 224, 224)
    with torch.no_grad():
        emb = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
        want = (head(torch.nn.functional.normalize(emb, dim=-1)) / 10).mean()
    assert got == pytest.approx(float(want), rel=1e-5)
