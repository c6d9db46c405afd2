"""``scripts/eval_digits_wan.py``: the classifier check of the video reference model scores what it claims.

Synthetic glyphs stand in for MNIST (no download): ten distinct random stroke patterns with pixel noise.
A stub pipeline returns clips drawn by the training generator, so the right digit must score high, a wrong
or missing one low.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dit_accel.zoo.moving_digits import MovingDigits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_digits_wan.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("eval_digits_wan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def glyphs(per_class: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.random((10, 7, 7)) > 0.55  # ten distinct coarse patterns, upscaled to 28x28 strokes
    images, labels = [], []
    for d in range(10):
        for _ in range(per_class):
            img = np.kron(base[d], np.ones((4, 4))) * 255.0
            img = np.clip(img * rng.uniform(0.8, 1.0) + rng.normal(0, 12, img.shape), 0, 255)
            images.append(img.astype(np.uint8))
            labels.append(d)
    return np.stack(images), np.array(labels, dtype=np.int64)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    module = load_script()
    images, labels = glyphs()
    model, heldout = module.train_classifier(images, labels, steps=80, seed=0, log=lambda *_: None)
    return module, model, heldout, images, labels


class StubPipe:
    """Returns, for "the digit D bouncing", a clip of glyph ``shift(D)`` made by the training generator."""

    def __init__(self, images, labels, shift=lambda d: d, blank=False):
        self.samplers = {d: MovingDigits(images[labels == d], labels[labels == d], max_digits=1) for d in range(10)}
        self.shift, self.blank = shift, blank

    def __call__(self, prompts, generator=None, output_type="pt"):
        clips = []
        for prompt in prompts:
            d = self.shift(int(prompt.split()[2]))
            clip, _ = self.samplers[d].sample(1, generator)
            clips.append(torch.full_like(clip, -1.0) if self.blank else clip)
        return SimpleNamespace(frames=(torch.cat(clips) + 1) / 2)  # [B, 1, F, H, W] in [0, 1], like output_type="pt"


def test_classifier_learns_the_generators_frames(trained):
    _, _, heldout, _, _ = trained
    assert heldout > 0.9


def test_right_digits_score_high_and_wrong_or_missing_ones_low(trained):
    module, model, _, images, labels = trained
    right = module.score_model(StubPipe(images, labels), model, seeds=1)["all"]
    wrong = module.score_model(StubPipe(images, labels, shift=lambda d: (d + 1) % 10), model, seeds=1)["all"]
    blank = module.score_model(StubPipe(images, labels, blank=True), model, seeds=1)["all"]
    assert right["presence"] == 1.0 and right["recognised"] > 0.85
    assert wrong["presence"] == 1.0 and wrong["recognised"] < 0.15
    assert blank["presence"] == 0.0 and blank["recognised"] == 0.0
    assert right["frames"] == 160
