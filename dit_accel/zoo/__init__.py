"""Reference-model zoo: small diffusion transformers trained by this project, loadable offline.

    >>> from dit_accel import zoo
    >>> zoo.available()
    ['cifar10_dit']
    >>> pipe = zoo.load("cifar10_dit")
    >>> images = pipe(class_labels=["cat", "ship"], generator=torch.Generator().manual_seed(0)).images

The weights ship inside the package (``dit_accel/zoo/weights/<name>.safetensors`` plus ``<name>.json``);
loading builds the transformer from the JSON config and loads the safetensors file, so it never
touches the network. See ``MODEL_CARD_cifar10_dit.md`` for how each model was trained and evaluated.

This sub-package depends only on torch, diffusers and safetensors, not on the rest of ``dit_accel``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .configs import CIFAR10_CLASSES, MODEL_CONFIGS, get_config
from .pipeline_class_conditional import ClassConditionalPipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = [
    "CIFAR10_CLASSES",
    "ClassConditionalPipeline",
    "MODEL_CONFIGS",
    "WEIGHTS_DIR",
    "available",
    "build_pipeline",
    "get_config",
    "load",
    "load_transformer",
    "weights_paths",
]


def weights_paths(name: str, weights_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(safetensors_path, json_path)`` of model ``name``."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return d / f"{name}.safetensors", d / f"{name}.json"


def available() -> list[str]:
    """Names of the reference models whose weights are present in this installation."""
    names = []
    for name in sorted(MODEL_CONFIGS):
        st, js = weights_paths(name)
        if st.is_file() and js.is_file():
            names.append(name)
    return names


def _read_meta(json_path: Path, name: str) -> dict:
    if json_path.is_file():
        with open(json_path) as f:
            return json.load(f)
    return get_config(name)


def load_transformer(
    name: str = "cifar10_dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | os.PathLike | None = None,
):
    """Build the transformer of model ``name`` from its JSON config and load its safetensors weights.

    Returns ``(transformer, meta)`` where ``meta`` is the parsed JSON.
    """
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import load_file

    st_path, js_path = weights_paths(name, weights_dir)
    if not st_path.is_file():
        raise FileNotFoundError(
            f"no weights for reference model {name!r} at {st_path}; available: {available()}"
        )
    meta = _read_meta(js_path, name)
    if meta.get("transformer_class", "DiTTransformer2DModel") != "DiTTransformer2DModel":
        raise NotImplementedError(f"transformer class {meta['transformer_class']!r}")
    model = DiTTransformer2DModel(**meta["transformer"])
    state = load_file(str(st_path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights of {name!r} do not match its config: missing={missing} unexpected={unexpected}")
    # eval() matters: in training mode the per-block LabelEmbedding drops labels at random.
    model = model.eval().requires_grad_(False)
    if dtype != torch.float32:
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # silence ModelMixin.to()'s "keep in float32" notice (no such modules)
        try:
            model = model.to(dtype=dtype)
        finally:
            dlogging.set_verbosity(level)
    model = model.to(device=device)
    return model, meta


def build_pipeline(transformer, meta: dict) -> ClassConditionalPipeline:
    """Wrap a transformer and the scheduler described by ``meta`` (parsed JSON) in a pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if meta.get("scheduler_class", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise NotImplementedError(f"scheduler class {meta['scheduler_class']!r}")
    scheduler = FlowMatchEulerDiscreteScheduler(**meta.get("scheduler", {}))
    pipe = ClassConditionalPipeline(
        transformer=transformer,
        scheduler=scheduler,
        labels=meta.get("classes"),
        null_class_id=meta.get("null_class_id"),
    )
    pipe.defaults = dict(meta.get("defaults", {}))
    pipe.model_name = meta.get("name")
    return pipe


def load(
    name: str = "cifar10_dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | os.PathLike | None = None,
) -> ClassConditionalPipeline:
    """Load reference model ``name`` as a ready-to-run :class:`ClassConditionalPipeline` (offline).

    ``pipe.defaults`` holds the sampler settings the model card's FID was measured with
    (``num_inference_steps``, ``guidance_scale``).
    """
    if name not in MODEL_CONFIGS and weights_dir is None:
        raise KeyError(f"unknown reference model {name!r}; known: {sorted(MODEL_CONFIGS)}")
    transformer, meta = load_transformer(name, device=device, dtype=dtype, weights_dir=weights_dir)
    pipe = build_pipeline(transformer, meta)
    pipe.set_progress_bar_config(disable=True)
    return pipe
