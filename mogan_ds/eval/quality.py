"""Aesthetic and imaging quality, as VBench computes them (v0.1.5).

Aesthetic quality (vbench/aesthetic_quality.py, `laion_aesthetic`): every frame,
`clip_transform(224)` (bicubic resize of the short side to 224 without antialiasing,
centre crop 224, /255, CLIP's mean/std), CLIP ViT-L/14 image embedding in fp32,
L2-normalised, the LAION aesthetic predictor ``nn.Linear(768, 1)``
(sa_0_4_vit_l_14_linear.pth), divided by 10; a video's score is the mean over its
frames (in batches of 32), the metric the mean over videos. VBench loads OpenAI's
``clip`` package checkpoint (ViT-L-14.pt); here the same weights come from a local
transformers CLIPModel folder (openai/clip-vit-large-patch14): image embedding =
``visual_projection(vision_model(x).pooler_output)``, the same function.

Imaging quality (vbench/imaging_quality.py, `technical_quality`): every frame, resized
so its longer side is at most 512 (VBench's default preprocessing "longer",
``transforms.Resize(..., antialias=False)``), /255, MUSIQ (pyiqa's MUSIQ arch with the
SPAQ checkpoint musiq_spaq_ckpt-358bb6af.pth); a video's score is the mean over frames,
the metric the mean over videos divided by 100. pyiqa is an optional extra
(``pip install -e .[eval-iqa]``): without it the column is n/a.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..models.weights_files import load_state_strict, load_weights_file, state_dict_of
from .weights import MetricUnavailableError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_BATCH = 32
MUSIQ_MAX_SIDE = 512


def clip_transform(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """VBench's `clip_transform(224)` on [T, 3, H, W] pixels as float in [0, 255] (VBench's load_video gives float, so the bicubic resize is not clamped)."""
    x = transforms.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=False)(frames)
    x = transforms.CenterCrop(size)(x).float().div(255.0)
    return transforms.Normalize(CLIP_MEAN, CLIP_STD)(x)


class AestheticQuality:
    def __init__(self, clip_folder: str | os.PathLike, mlp_path: str | os.PathLike, device="cpu"):
        from transformers import CLIPModel

        self.device = torch.device(device)
        self.clip = CLIPModel.from_pretrained(str(clip_folder)).float().to(self.device).eval().requires_grad_(False)
        self.mlp = torch.nn.Linear(self.clip.config.projection_dim, 1)
        expected = "an aesthetic predictor for this CLIP (sa_0_4_vit_l_14_linear.pth)"
        sd = state_dict_of(load_weights_file(mlp_path, expected), mlp_path, expected)
        load_state_strict(self.mlp, sd, mlp_path, expected)
        self.mlp.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def video(self, frames: np.ndarray) -> float:
        """Mean over frames of the aesthetic score / 10, on uint8 RGB [T, H, W, 3]."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        scores = []
        for i in range(0, x.shape[0], AESTHETIC_BATCH):
            pix = clip_transform(x[i : i + AESTHETIC_BATCH]).to(self.device)
            pooled = self.clip.vision_model(pixel_values=pix).pooler_output
            feats = F.normalize(self.clip.visual_projection(pooled).float(), dim=-1, p=2)
            scores.append(self.mlp(feats).squeeze(-1))
        return float((torch.cat(scores) / 10).mean())


def musiq_resize(frames: torch.Tensor) -> torch.Tensor:
    """VBench's imaging-quality `transform(..., "longer")` on uint8 [T, 3, H, W] -> float in [0, 1]."""
    _, _, h, w = frames.shape
    if max(h, w) > MUSIQ_MAX_SIDE:
        scale = MUSIQ_MAX_SIDE / max(h, w)
        frames = transforms.Resize(size=(int(scale * h), int(scale * w)), antialias=False)(frames)
    return frames / 255.0


class ImagingQuality:
    def __init__(self, musiq_path: str | os.PathLike, device="cpu"):
        try:
            from pyiqa.archs.musiq_arch import MUSIQ
        except ImportError:
            raise MetricUnavailableError(
                "imaging quality: pyiqa is not installed (pip install -e '.[eval-iqa]'), column is n/a"
            ) from None
        self.device = torch.device(device)
        # As VBench's MUSIQ(pretrained_model_path=...): num_class 1 (SPAQ), DataParallel's "module." prefix
        # dropped, a strict load; but read weights-only here (pyiqa's loader unpickles the file in full, which
        # runs whatever code a file names). VBench sets only the top module's `training` flag; MUSIQ's dropout
        # rates are 0 and it has no batch norm, so .eval() is the same function.
        expected = "a MUSIQ checkpoint (musiq_spaq_ckpt-358bb6af.pth)"
        sd = state_dict_of(load_weights_file(musiq_path, expected), musiq_path, expected)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        model = MUSIQ(pretrained=False)
        load_state_strict(model, sd, musiq_path, expected)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def video(self, frames: np.ndarray) -> float:
        """Mean over frames of MUSIQ (0..100) / 100, on uint8 RGB [T, H, W, 3]."""
        x = musiq_resize(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float())
        total = sum(float(self.model(f[None].to(self.device))) for f in x)
        return total / x.shape[0] / 100.0
