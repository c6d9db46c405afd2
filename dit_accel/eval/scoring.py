"""Applies the metrics a sweep asks for (see :mod:`dit_accel.eval.metrics`) to generated outputs.

Networks (LPIPS, CLIP, the FID feature network) are loaded on first use and kept; a FID metric is kept per
reference set, so reference features are extracted once per process.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from . import metrics, refs
from .models import as_images
from .sweep import SweepSpec


class MetricSuite:
    def __init__(self, spec: SweepSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.wanted = set(spec.metrics)
        self._lpips: Any = None
        self._clip: Any = None
        self._fid: dict[str, Any] = {}
        # a missing package fails here, before the first sample is generated
        metrics.check_requirements(spec.metrics, spec.lpips, spec.fid)

    # -------------------------------------------------------------- per sample
    def sample(self, output: torch.Tensor, reference: torch.Tensor | None, kind: str,
               clip_text: str | None) -> dict[str, Any]:
        """Metrics of one output (and against its baseline ``reference`` unless it is the baseline)."""
        row: dict[str, Any] = {}
        images = as_images(output, kind)
        if reference is not None:
            ref_images = as_images(reference, kind)
            if "psnr" in self.wanted:
                row["psnr"] = metrics.psnr(output, reference, data_range=1.0 if images is not None else None)
            if "rel_l2" in self.wanted:
                row["rel_l2"] = metrics.rel_l2(output, reference)
            if images is not None and "ssim" in self.wanted:
                row["ssim"] = metrics.ssim(images, ref_images)
            if images is not None and "lpips" in self.wanted:
                row["lpips"] = float(self.lpips(images.to(self.device), ref_images.to(self.device)).mean())
        if images is not None and clip_text is not None and "clip" in self.wanted:
            scores = metrics.clip_scores(self.clip, images.to(self.device), [clip_text] * len(images))
            row["clip"] = float(np.mean(scores))
        return row

    @property
    def lpips(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self._lpips is None:
            cfg = self.spec.lpips
            if "backbone" in cfg:
                backbone = cfg["backbone"]
                backbone = refs.resolve(backbone, self.spec.base_dir)() if refs.is_ref(backbone) else backbone
                self._lpips = metrics.load_lpips(backbone=backbone, device=self.device)
            else:
                self._lpips = metrics.load_lpips(net=cfg["net"], device=self.device)
        return self._lpips

    @property
    def clip(self) -> Any:
        if self._clip is None:
            model = self.spec.clip["model"]
            model = refs.resolve(model, self.spec.base_dir) if refs.is_ref(model) else model
            self._clip = metrics.load_clip(model, device=self.device)
        return self._clip

    # ------------------------------------------------------------------- FID
    def fid(self, reference_id: str, real: Callable[[], Iterable[torch.Tensor]],
            fake: Iterable[torch.Tensor]) -> float | None:
        """FID of the ``fake`` image batches against the reference set ``reference_id`` (``real`` yields its
        image batches the first time it is needed). None with fewer than 2 images on either side."""
        metric = self._fid.get(reference_id)
        if metric is None:
            metric = self._fid[reference_id] = self._new_fid()
            for batch in real():
                metric.update(batch.to(self.device), real=True)
        metric.reset()  # keeps the real features (reset_real_features=False)
        for batch in fake:
            metric.update(batch.to(self.device), real=False)
        if int(metric.real_features_num_samples) < 2 or int(metric.fake_features_num_samples) < 2:
            return None
        value = float(metric.compute())
        return value if math.isfinite(value) else None

    def _new_fid(self) -> Any:
        feature = self.spec.fid["feature"]
        if refs.is_ref(feature):
            feature = refs.resolve(feature, self.spec.base_dir)()
        return metrics.load_fid(feature, device=self.device)


def reference_images(path: str | Path, limit: int | None = None, batch: int = 256) -> Iterable[torch.Tensor]:
    """Image batches [B, 3, H, W] in [0, 1] from a folder of images or an ``.npz`` holding ``images``
    (N×H×W×3 or N×3×H×W uint8) or ``jpeg`` + ``offsets`` (concatenated JPEG files)."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        files = files[:limit] if limit else files
        decoded = (np.asarray(Image.open(p).convert("RGB")) for p in files)
    elif path.suffix == ".npz":
        data = np.load(path)
        if "images" in data.files:
            arr = data["images"][:limit] if limit else data["images"]
            if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[-1] != 3:
                arr = arr.transpose(0, 2, 3, 1)
            decoded = iter(arr)
        elif {"jpeg", "offsets"} <= set(data.files):
            blob, offsets = data["jpeg"], data["offsets"]
            n = len(offsets) - 1 if not limit else min(limit, len(offsets) - 1)
            decoded = (np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                       for i in range(n))
        else:
            raise ValueError(f"{path}: expected an 'images' array or 'jpeg' + 'offsets' arrays")
    else:
        raise ValueError(f"FID reference {str(path)!r}: expected a folder of images or an .npz file")
    chunk: list[np.ndarray] = []
    for image in decoded:
        chunk.append(image)
        if len(chunk) == batch:
            yield _to_tensor(chunk)
            chunk = []
    if chunk:
        yield _to_tensor(chunk)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
