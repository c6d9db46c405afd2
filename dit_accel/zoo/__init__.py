"""Reference-model zoo: small diffusion transformers trained by this project, loadable offline.

    >>> from dit_accel import zoo
    >>> zoo.available()
    ['cifar10_dit', 'cifar10_dit_eps', 'cifar10_mmdit', 'digits_wan']
    >>> pipe = zoo.load("cifar10_dit")
    >>> images = pipe(class_labels=["cat", "ship"], generator=torch.Generator().manual_seed(0)).images
    >>> images = zoo.load("cifar10_mmdit")(["a photo of a cat", "a blurry photo of a ship"]).images
    >>> clips = zoo.load("digits_wan")(["the digits 3 and 7 bouncing"]).frames   # [1, 16, 32, 32, 3]

The weights ship inside the package (``dit_accel/zoo/weights/<name>.safetensors`` plus ``<name>.json``);
loading builds the transformer from the JSON config and loads the safetensors file, so it never
touches the network. See ``MODEL_CARD_<name>.md`` for how each model was trained and evaluated.

This sub-package depends only on torch, diffusers and safetensors, not on the rest of ``dit_accel``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .configs import CIFAR10_CLASSES, MODEL_CONFIGS, get_config
from .pipeline_class_conditional import ClassConditionalPipeline
from .pipeline_text import TextToImagePipeline, TextToVideoPipeline, VideoPipelineOutput
from . import text
from .text import build_text_encoder, build_tokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = [
    "CIFAR10_CLASSES",
    "ClassConditionalPipeline",
    "MODEL_CONFIGS",
    "TextToImagePipeline",
    "TextToVideoPipeline",
    "VideoPipelineOutput",
    "build_components",
    "class_conditions",
    "class_names",
    "generate_images",
    "load_components",
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


TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel")
SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler", "DDIMScheduler")
PIPELINE_CLASSES = {"ClassConditionalPipeline": ClassConditionalPipeline, "TextToImagePipeline": TextToImagePipeline,
                    "TextToVideoPipeline": TextToVideoPipeline}


def build_components(meta: dict) -> dict:
    """Freshly initialised modules of a model described by ``meta`` (its config or parsed JSON):
    ``{"transformer"}``, plus ``"text_encoder"`` and ``"tokenizer"`` for the text-conditional models."""
    import diffusers

    cls_name = meta.get("transformer_class", "DiTTransformer2DModel")
    if cls_name not in TRANSFORMER_CLASSES:
        raise NotImplementedError(f"transformer class {cls_name!r}; the zoo builds {list(TRANSFORMER_CLASSES)}")
    kwargs = dict(meta["transformer"])
    if "patch_size" in kwargs and isinstance(kwargs["patch_size"], list):
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    components = {"transformer": getattr(diffusers, cls_name)(**kwargs)}
    if "text_encoder" in meta:
        tokenizer = build_tokenizer(meta["vocab"], meta.get("max_text_length", 16))
        components["tokenizer"] = tokenizer
        components["text_encoder"] = build_text_encoder(meta["text_encoder"], tokenizer)
    return components


def _to(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    model = model.eval().requires_grad_(False)  # eval(): DiT's LabelEmbedding drops labels in training mode
    if dtype != torch.float32:
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # silence ModelMixin.to()'s "keep in float32" notice (no such modules)
        try:
            model = model.to(dtype=dtype)
        finally:
            dlogging.set_verbosity(level)
    return model.to(device=device)


def load_components(
    name: str = "cifar10_dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | os.PathLike | None = None,
) -> tuple[dict, dict]:
    """Build the modules of model ``name`` from its JSON config and load its safetensors weights.

    Returns ``(components, meta)``. The weights file holds the transformer's tensors (prefixed
    ``transformer.`` when the model also has a ``text_encoder.``); the text encoder stays in float32
    (it is tiny and runs once per call).
    """
    from safetensors.torch import load_file

    st_path, js_path = weights_paths(name, weights_dir)
    if not st_path.is_file():
        raise FileNotFoundError(
            f"no weights for reference model {name!r} at {st_path}; available: {available()}"
        )
    meta = _read_meta(js_path, name)
    components = build_components(meta)
    state = load_file(str(st_path), device="cpu")
    modules = {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
    for key, module in modules.items():
        if len(modules) == 1:
            part = state
        else:
            part = {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + ".")}
        missing, unexpected = module.load_state_dict(part, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{key} weights of {name!r} do not match its config: "
                               f"missing={missing} unexpected={unexpected}")
    components["transformer"] = _to(components["transformer"], device, dtype)
    if "text_encoder" in components:
        components["text_encoder"] = _to(components["text_encoder"], device, torch.float32)
    return components, meta


def load_transformer(
    name: str = "cifar10_dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | os.PathLike | None = None,
):
    """The transformer of model ``name`` with its weights: ``(transformer, meta)``."""
    components, meta = load_components(name, device, dtype, weights_dir)
    return components["transformer"], meta


def build_pipeline(components, meta: dict):
    """Wrap loaded modules (a dict from :func:`load_components`, or a bare transformer) and the scheduler
    described by ``meta`` in the model's pipeline class."""
    import diffusers

    scheduler_class = meta.get("scheduler_class", "FlowMatchEulerDiscreteScheduler")
    if scheduler_class not in SCHEDULER_CLASSES:
        raise NotImplementedError(f"scheduler class {scheduler_class!r}; the zoo builds {list(SCHEDULER_CLASSES)}")
    if isinstance(components, torch.nn.Module):
        components = {"transformer": components}
    scheduler = getattr(diffusers, scheduler_class)(**meta.get("scheduler", {}))
    cls = PIPELINE_CLASSES[meta.get("pipeline_class", "ClassConditionalPipeline")]
    if cls is ClassConditionalPipeline:
        pipe = cls(transformer=components["transformer"], scheduler=scheduler, labels=meta.get("classes"),
                   null_class_id=meta.get("null_class_id"))
    else:
        pipe = cls(scheduler=scheduler, **components)
        if "num_frames" in meta:
            pipe.video_size = (int(meta["num_frames"]), int(meta["image_size"]), int(meta["image_size"]))
    pipe.defaults = dict(meta.get("defaults", {}))
    pipe.model_name = meta.get("name")
    return pipe


def class_conditions(pipe, labels) -> dict:
    """Call arguments conditioning a zoo pipeline on class ids: ``class_labels``, or each class's canonical
    prompt (``"a photo of a cat"``; the video model: ``"the digit 3 bouncing"``)."""
    if isinstance(pipe, TextToVideoPipeline):
        return {"prompt": [text.digits_prompt([int(c)]) for c in labels]}
    if isinstance(pipe, TextToImagePipeline):
        return {"prompt": [text.cifar10_prompt(int(c)) for c in labels]}
    return {"class_labels": [int(c) for c in labels]}


def class_names(pipe) -> list[str]:
    """The class id -> name table that :func:`class_conditions` follows."""
    if isinstance(pipe, TextToVideoPipeline):
        return [f"digit {d}" for d in range(10)]
    if isinstance(pipe, TextToImagePipeline):
        return list(CIFAR10_CLASSES)
    return [pipe.id2label[i] for i in range(pipe.num_classes)]


def generate_images(pipe, conditions: dict, **call_kwargs) -> torch.Tensor:
    """Run a zoo pipeline and return ``[N, 3, H, W]`` floats in [0, 1]: its images, or its clips' frames
    (clip by clip, grey as RGB)."""
    out = pipe(**conditions, output_type="pt", **call_kwargs)
    if isinstance(pipe, TextToVideoPipeline):
        return out.frames.transpose(1, 2).flatten(0, 1).expand(-1, 3, -1, -1)  # [B, C, F, H, W] -> frames
    return out.images


def load(
    name: str = "cifar10_dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | os.PathLike | None = None,
):
    """Load reference model ``name`` as a ready-to-run pipeline (offline): :class:`ClassConditionalPipeline`
    (``cifar10_dit``), :class:`TextToImagePipeline` (``cifar10_mmdit``) or :class:`TextToVideoPipeline`
    (``digits_wan``).

    ``pipe.defaults`` holds the sampler settings the model card's FID was measured with
    (``num_inference_steps``, ``guidance_scale``).
    """
    if name not in MODEL_CONFIGS and weights_dir is None:
        raise KeyError(f"unknown reference model {name!r}; known: {sorted(MODEL_CONFIGS)}")
    components, meta = load_components(name, device=device, dtype=dtype, weights_dir=weights_dir)
    pipe = build_pipeline(components, meta)
    pipe.set_progress_bar_config(disable=True)
    return pipe
