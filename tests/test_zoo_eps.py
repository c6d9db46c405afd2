"""The noise-prediction reference model ``cifar10_dit_eps`` (DDPM epsilon-prediction, DDIM sampling) and the
training objective that made it (``scripts/train_reference.py``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dit_accel import zoo  # noqa: E402

NAME = "cifar10_dit_eps"
ROOT = Path(__file__).resolve().parents[1]
needs_weights = pytest.mark.skipif(NAME not in zoo.available(), reason="reference weights not installed")


@pytest.fixture(scope="module")
def pipe():
    return zoo.load(NAME)


@needs_weights
def test_files_and_config():
    st, js = zoo.weights_paths(NAME)
    assert st.stat().st_size <= 16_000_000, "weights file must stay <= 16 MB"
    meta = json.loads(js.read_text())
    cfg = zoo.get_config(NAME)
    assert meta["transformer"] == cfg["transformer"] == zoo.get_config("cifar10_dit")["transformer"]
    assert meta["scheduler_class"] == "DDIMScheduler" and meta["prediction"] == "epsilon"
    assert meta["scheduler"] == cfg["scheduler"]
    assert meta["training"]["steps"] > 1000


@needs_weights
def test_loads_with_ddim_predicting_noise(pipe):
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.defaults == {"num_inference_steps": 50, "guidance_scale": 2.0}


@needs_weights
def test_timesteps_are_integer_training_steps(pipe):
    """The network is called with DDPM's integer timesteps (not 1000 * sigma), CFG batched [uncond, cond]."""
    seen = []
    tr = pipe.transformer
    orig = tr.forward

    def spy(hidden_states, timestep=None, class_labels=None, **kw):
        seen.append((hidden_states.shape[0], timestep.clone(), class_labels.clone()))
        return orig(hidden_states, timestep=timestep, class_labels=class_labels, **kw)

    tr.forward = spy
    try:
        pipe(class_labels=[3], num_inference_steps=4, output_type="pt")
    finally:
        del tr.forward
    assert [float(t[0]) for _, t, _ in seen] == [750.0, 500.0, 250.0, 0.0]
    assert all(b == 2 and lab.tolist() == [10, 3] for b, _, lab in seen)


@needs_weights
def test_trained_model_makes_images_not_noise(pipe):
    """Ten DDIM steps give smooth images in range (neighbouring pixels correlate), deterministic per seed."""
    def run(seed):
        return pipe(class_labels=[0, 1, 7, 8], num_inference_steps=10,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images

    x = run(0)
    assert torch.equal(x, run(0)) and not torch.equal(x, run(1))
    a, b = x[..., :, 1:].reshape(-1), x[..., :, :-1].reshape(-1)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.7, f"horizontal pixel correlation {corr:.2f}"
    assert 0.1 < float(x.std()) < 0.45, "neither collapsed nor saturated"


def _train_script():
    spec = importlib.util.spec_from_file_location("_train_reference_test", ROOT / "scripts" / "train_reference.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_epsilon_objective_trains_and_exports(tmp_path):
    """A few CPU steps of the noise-prediction objective: finite decreasing-scale loss, weights the zoo loads."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), labels=np.arange(32) % 10)
    train = _train_script()
    assert train.first_per_class(np.array([0, 1, 0, 2, 1, 0, 0]), 2).tolist() == [0, 1, 2, 3, 4]
    abar = train.ddpm_alphas_cumprod(zoo.get_config(NAME), torch.device("cpu"))
    assert abar.shape == (1000,) and float(abar[0]) > 0.99 and float(abar[-1]) < 1e-3
    assert train.ddpm_alphas_cumprod(zoo.get_config("cifar10_dit"), torch.device("cpu")) is None
    out = tmp_path / "run"
    rc = train.main(["--model", NAME, "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "4",
                     "--device", "cpu", "--log-every", "1", "--no-ckpt", "--warmup-steps", "1"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(e["loss"]) for e in log)
    assert 0.5 < log[0]["loss"] < 2.0, "a zero-initialised output layer predicts no noise: loss ~ E[noise^2] = 1"
    pipe = zoo.load(NAME, weights_dir=out)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    x = pipe(class_labels=[1], num_inference_steps=2, output_type="raw").images
    assert torch.isfinite(x).all()
