"""CPU tests of the reference-model zoo (dit_accel.zoo): offline loading, sampling, determinism, CFG batching."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dit_accel import zoo  # noqa: E402

NAME = "cifar10_dit"


@pytest.fixture(scope="module")
def pipe():
    return zoo.load(NAME)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("dit_accel.zoo tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_available_and_files():
    assert NAME in zoo.available()
    st, js = zoo.weights_paths(NAME)
    assert st.is_file() and js.is_file()
    assert st.stat().st_size <= 16_000_000, "weights file must stay <= 16 MB"


def test_json_config_matches_code():
    _, js = zoo.weights_paths(NAME)
    meta = json.loads(js.read_text())
    cfg = zoo.get_config(NAME)
    assert meta["transformer"] == cfg["transformer"]
    assert meta["scheduler"] == cfg["scheduler"]
    assert meta["classes"] == list(zoo.CIFAR10_CLASSES)
    assert meta["null_class_id"] == 10
    assert meta["num_parameters"] < 8_000_000
    assert meta["defaults"]["num_inference_steps"] > 0 and meta["defaults"]["guidance_scale"] >= 1.0


def test_load_offline(no_network):
    p = zoo.load(NAME, device="cpu", dtype=torch.float32)
    tr = p.transformer
    assert type(tr).__name__ == "DiTTransformer2DModel"
    assert not tr.training, "transformer must be in eval mode (LabelEmbedding drops labels in training mode)"
    assert tr.dtype == torch.float32
    assert type(p.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    n = sum(x.numel() for x in tr.parameters())
    assert 5_000_000 < n < 8_000_000


def test_labels(pipe):
    assert pipe.labels["airplane"] == 0 and pipe.labels["truck"] == 9
    assert pipe.get_label_ids(["cat", "ship"]) == [3, 8]
    assert pipe.id2label[5] == "dog"
    assert pipe.num_classes == 10 and pipe.null_class_id == 10
    with pytest.raises(ValueError):
        pipe.get_label_ids(["unicorn"])


def test_sample_shape_and_range(pipe, no_network):
    g = torch.Generator().manual_seed(0)
    x = pipe(class_labels=[0, "cat", 9], num_inference_steps=2, guidance_scale=2.0, generator=g,
             output_type="pt").images
    assert x.shape == (3, 3, 32, 32)
    assert torch.isfinite(x).all()
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    arr = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(1),
               output_type="np").images
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32
    ims = pipe(class_labels=[4], num_inference_steps=2, output_type="pil").images
    assert len(ims) == 1 and ims[0].size == (32, 32) and ims[0].mode == "RGB"


def test_deterministic_with_seed(pipe):
    def run(seed):
        return pipe(class_labels=[2, 7], num_inference_steps=2, guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images

    a, b, c = run(123), run(123), run(124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cfg_is_batched_uncond_cond(pipe):
    calls = []
    tr = pipe.transformer
    orig = tr.forward

    def spy(hidden_states, timestep=None, class_labels=None, **kw):
        calls.append((hidden_states.shape[0], class_labels.clone(), timestep.clone()))
        return orig(hidden_states, timestep=timestep, class_labels=class_labels, **kw)

    tr.forward = spy
    try:
        pipe(class_labels=[3, 5, 8], num_inference_steps=3, guidance_scale=2.0, output_type="pt")
        assert len(calls) == 3, "one transformer call per step"
        for bs, labels, ts in calls:
            assert bs == 6
            assert labels[:3].tolist() == [10, 10, 10] and labels[3:].tolist() == [3, 5, 8]
            assert ts.shape == (6,) and float(ts.max()) <= 1000.0
        calls.clear()
        pipe(class_labels=[3, 5], num_inference_steps=2, guidance_scale=1.0, output_type="pt")
        assert [c[0] for c in calls] == [2, 2], "guidance_scale <= 1 runs the conditional branch alone"
    finally:
        del tr.forward
    assert tr.forward == orig


@pytest.mark.slow
def test_trained_model_makes_images_not_noise(pipe):
    """A few Euler steps of the trained model give smooth images (neighbouring pixels correlate), unlike noise."""
    x = pipe(class_labels=[0, 1, 7, 8], num_inference_steps=6, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="pt").images
    a, b = x[..., :, 1:].reshape(-1), x[..., :, :-1].reshape(-1)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.7, f"horizontal pixel correlation {corr:.2f}"
