"""Small deterministic stand-ins for the metric networks, for tests and offline smoke sweeps.

Random weights under a fixed seed: they exercise the metric code paths (FID accumulation, LPIPS
normalisation, CLIP scoring) but their numbers mean nothing about image quality. Sweep files name them
as ``py:dit_accel.eval.testing:tiny_feature_net`` etc.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..testing.components import seeded as _seeded


class TinyFeatureNet(nn.Module):
    """A fixed random conv + ReLU + global average pool: images [N, 3, H, W] in [0, 1] -> [N, dim]."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.num_features = dim
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float())).mean(dim=(-2, -1))


class TinyBackbone(nn.Module):
    """Two fixed random conv stages; returns both feature maps (an LPIPS backbone)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.stage1 = nn.Conv2d(3, 8, 3, padding=1)
            self.stage2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.relu(self.stage1(x.float()))
        return [a, torch.relu(self.stage2(a))]


def tiny_feature_net(**kwargs: Any) -> TinyFeatureNet:
    return TinyFeatureNet(**kwargs)


def tiny_backbone(**kwargs: Any) -> TinyBackbone:
    return TinyBackbone(**kwargs)


def tiny_clip(seed: int = 1) -> tuple[Any, Any]:
    """A random-weight ``CLIPModel`` (32×32 images, 32-d embeddings) and its processor, built offline.

    The default seed gives positive image-text similarities, so scores are not all clamped to 0.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ..testing.components import CLIP_LEN
    from ..testing.components import tokenizer as _tokenizer

    tokenizer = _tokenizer("clip", CLIP_LEN)
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=CLIP_LEN, bos_token_id=3, eos_token_id=1,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with _seeded(seed):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)
