"""Model specs of the eval harness: tiny pipelines, pipeline folders (the hub path), py: factories, the zoo."""

from __future__ import annotations

import pytest
import torch

from dit_accel.eval.models import as_images, load_model
from dit_accel.eval.runner import run_sweep
from dit_accel.eval.store import ResultStore
from dit_accel.eval.sweep import SweepSpec


def test_tiny_models():
    dit = load_model("tiny-dit")
    assert dit.conditioning == "class" and dit.output == "image" and dit.class_names[5] == "cat"
    x = dit.generate(1, 0, 2)
    assert x.shape[:2] == (1, 3) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, dit.generate(1, 0, 2)) and not torch.equal(x, dit.generate(1, 1, 2))
    wan = load_model("tiny-wan")
    assert wan.conditioning == "text" and wan.output == "latent"
    assert as_images(wan.generate("a cat", 0, 2), "latent") is None
    with pytest.raises(ValueError, match="tiny-flux"):
        load_model("tiny-nope")


def test_pipeline_folder_is_loaded_like_a_hub_id(tmp_path):
    from dit_accel.testing import tiny_pipeline

    tiny_pipeline("pixart").save_pretrained(tmp_path / "pixart")
    model = load_model(str(tmp_path / "pixart"), dict(height=16, width=16, max_sequence_length=16,
                                                      use_resolution_binning=False, clean_caption=False),
                       dtype="float32")
    assert model.output == "image" and model.conditioning == "text"
    images = model.generate("a red fox", 0, 2)
    assert images.shape == (1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


FACTORY = '''
from dit_accel.eval.models import EvalModel, load_model

def build(device, dtype, scale=1.0):
    inner = load_model("tiny-sd3", device=device)
    return EvalModel("scaled", inner.pipe, lambda c, s, n: scale * inner.generate(c, s, n), device=device)

def wrong(device, dtype):
    return 42
'''


def test_py_factory_from_a_file(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    spec = SweepSpec.from_dict({"models": [{"name": "py:factory.py:build", "kwargs": {"scale": 2.0}}],
                                "policies": ["fora"], "steps": [4], "fewer_steps": [], "prompts": "builtin:1",
                                "timing": {"warmup": 0, "repeats": 1}, "device": "cpu"}, base_dir=str(tmp_path))
    summary = run_sweep(spec, tmp_path / "store", progress=False)
    assert summary.configs == 2 and summary.samples == 2
    with pytest.raises(TypeError, match="EvalModel"):
        load_model("py:factory.py:wrong", base_dir=str(tmp_path))


def test_zoo_model_sweep(tmp_path):
    from dit_accel import zoo

    if "cifar10_dit" not in zoo.available():
        pytest.skip("reference model weights not installed")
    spec = SweepSpec.from_dict({"models": ["zoo:cifar10_dit"], "policies": ["fora"], "steps": [6], "seeds": 1,
                                "classes": ["cat", "ship"], "fewer_steps": [2], "device": "cpu",
                                "metrics": ["psnr", "ssim", "fid"], "timing": {"warmup": 0, "repeats": 1},
                                "fid": {"feature": "py:dit_accel.eval.testing:tiny_feature_net"}})
    run_sweep(spec, tmp_path, progress=False)
    fora = next(r for r in ResultStore(tmp_path).rows("config") if r["variant"] == "fora")
    assert 0 < fora["ssim"] < 1 and fora["psnr"] > 10 and fora["fid"] >= 0


@pytest.mark.parametrize("name,frames", [("cifar10_mmdit", 1), ("digits_wan", 16)])
def test_text_zoo_models_take_class_conditions(name, frames):
    """The text reference models run in the harness with class ids (their canonical prompts)."""
    from dit_accel import zoo

    if name not in zoo.available():
        pytest.skip("reference model weights not installed")
    model = load_model(f"zoo:{name}")
    assert model.conditioning == "class" and model.num_classes == 10
    assert model.class_names[3] in ("cat", "digit 3")
    out = model.generate(3, 0, 1)
    assert out.shape == (frames, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_sweep_records_attention_density(tmp_path):
    """A sparse-attention policy's density reaches the store; a policy without an attention section is dense."""
    sparse = {"name": "topp-half", "attention": {"sparse": {"method": "topp", "density": 0.5}, "block_size": 16,
                                                 "warmup_steps": 0}}
    spec = SweepSpec.from_dict({"models": [{"name": "tiny-flux", "kwargs": {"height": 64, "width": 64}}],
                                "policies": ["fora", sparse], "steps": [3], "seeds": 1, "prompts": ["a cat"],
                                "device": "cpu", "metrics": ["psnr"], "timing": {"warmup": 0, "repeats": 1}})
    run_sweep(spec, tmp_path, progress=False)
    rows = {r["variant"]: r for r in ResultStore(tmp_path).rows("config")}
    assert rows["fora"]["attention_density"] == 1.0
    assert 0.3 < rows["topp-half"]["attention_density"] < 0.9
