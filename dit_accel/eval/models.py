"""Models to evaluate: one loader per kind of model spec, all giving an :class:`EvalModel`.

* ``tiny-FAMILY`` — the tiny random-weight pipelines of :mod:`dit_accel.testing` (``tiny-flux``, ``tiny-dit``…);
  outputs are latents (images in [0, 1] for ``tiny-dit``, which always decodes).
* ``zoo:NAME`` — a trained reference model of :mod:`dit_accel.zoo` (class-conditional, images in [0, 1]).
* ``py:MODULE_OR_FILE:FACTORY`` — ``FACTORY(device=..., dtype=..., **kwargs)`` returns an :class:`EvalModel`
  (e.g. a full-size transformer with random weights, see ``benchmarks/sweep_flux.py``).
* anything else — a diffusers pipeline id or folder for ``DiffusionPipeline.from_pretrained`` (text to image
  or video, decoded to [0, 1]); ``kwargs`` go to the call (``height``, ``width``, ``guidance_scale``…).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import refs

Condition = str | int  # a prompt, or a class id for class-conditional models
OUTPUT_KINDS = ("image", "video", "latent")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EvalModel:
    """A pipeline plus how to make one sample with it.

    ``generate(condition, seed, steps)`` returns one output with a leading batch dimension of 1: images
    [1, 3, H, W] or video frames [1, F, 3, H, W] in [0, 1], or latents of any shape. The noise comes from
    ``torch.Generator("cpu").manual_seed(seed)`` so outputs do not depend on the GPU the sample ran on.
    """

    name: str
    pipe: Any
    generate: Callable[[Condition, int, int], torch.Tensor]
    output: str = "latent"
    conditioning: str = "text"  # "text" or "class"
    num_classes: int | None = None
    class_names: Sequence[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"{self.name}: output must be one of {OUTPUT_KINDS}, got {self.output!r}")
        if self.conditioning not in ("text", "class"):
            raise ValueError(f"{self.name}: conditioning must be 'text' or 'class', got {self.conditioning!r}")


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


def _first(out: Any) -> torch.Tensor:
    x = out.frames if hasattr(out, "frames") else out.images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pipeline returned {type(x).__name__}; call it with output_type='pt' or 'latent'")
    return x


def _tiny_classes(pipe: Any) -> tuple[int, list[str] | None]:
    """(number of classes, their names) of the tiny class-conditional pipeline."""
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    names = None
    if getattr(pipe, "labels", None):  # DiTPipeline keeps name -> id (synonyms share an id)
        first = {i: name for name, i in sorted(pipe.labels.items(), reverse=True)}
        names = [first.get(i, str(i)) for i in range(num_classes)]
    return num_classes, names


def _tiny(family: str, device: torch.device, dtype: torch.dtype | None, kwargs: dict) -> EvalModel:
    from ..testing import tiny_call_kwargs, tiny_pipeline

    if device.type == "cpu":
        torch.set_num_threads(1)  # millisecond-sized ops: more threads only add hand-off stalls (as in demo)
    pipe = tiny_pipeline(family).to(device)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    is_class = family == "dit"

    def generate(condition: Condition, seed: int, steps: int) -> torch.Tensor:
        cond = {"class_labels": [int(condition)]} if is_class else {"prompt": str(condition)}
        call = tiny_call_kwargs(family, num_inference_steps=steps, generator=generator(seed), **cond, **kwargs)
        return _first(pipe(**call))

    num_classes, names = _tiny_classes(pipe) if is_class else (None, None)
    return EvalModel(f"tiny-{family}", pipe, generate, output="image" if is_class else "latent",
                     conditioning="class" if is_class else "text", num_classes=num_classes, class_names=names,
                     device=device)


def _zoo(name: str, device: torch.device, dtype: torch.dtype | None, kwargs: dict) -> EvalModel:
    """A reference model of ``dit_accel.zoo``. Conditions are class ids for all of them: the text models
    get the class's canonical prompt (``"a photo of a cat"``; digits_wan: ``"the digit 3 bouncing"``,
    scored frame by frame)."""
    from .. import zoo

    pipe = zoo.load(name, device=device, dtype=dtype or torch.float32)
    call_defaults = {k: v for k, v in pipe.defaults.items() if k != "num_inference_steps"}

    def generate(condition: Condition, seed: int, steps: int) -> torch.Tensor:
        return zoo.generate_images(pipe, zoo.class_conditions(pipe, [int(condition)]), num_inference_steps=steps,
                                   generator=generator(seed), **{**call_defaults, **kwargs})

    names = zoo.class_names(pipe)
    return EvalModel(f"zoo:{name}", pipe, generate, output="image", conditioning="class",
                     num_classes=len(names), class_names=names, device=device)


def _pretrained(name: str, device: torch.device, dtype: torch.dtype | None, kwargs: dict) -> EvalModel:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(name, dtype=dtype or torch.bfloat16).to(device)  # torch_dtype: deprecated
    pipe.set_progress_bar_config(disable=True)
    is_video = "num_frames" in inspect.signature(pipe.__call__).parameters

    def generate(condition: Condition, seed: int, steps: int) -> torch.Tensor:
        out = _first(pipe(prompt=str(condition), num_inference_steps=steps, generator=generator(seed),
                          output_type="pt", **kwargs))
        return out.float()

    return EvalModel(name, pipe, generate, output="video" if is_video else "image", device=device)


@dataclass(frozen=True)
class ModelInfo:
    """What a sweep needs to know about a model before loading it: its conditioning ("text", "class", or None
    when only its factory knows) and, for class-conditional models, the class table."""

    conditioning: str | None
    num_classes: int | None = None
    class_names: Sequence[str] | None = None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # organisation/name


def _tiny_family(name: str) -> str:
    from ..testing import FAMILIES

    family = name[len("tiny-"):]
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {['tiny-' + f for f in FAMILIES]}")
    return family


def _zoo_name(name: str) -> str:
    from .. import zoo

    if name not in zoo.available():
        hint = " (its weights are not installed)" if name in zoo.MODEL_CONFIGS else ""
        raise ValueError(f"unknown zoo model 'zoo:{name}'{hint}; available: {['zoo:' + n for n in zoo.available()]}")
    return name


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {list(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def describe_model(name: str, dtype: str | torch.dtype | None = None, base_dir: str | None = None) -> ModelInfo:
    """Check that ``name`` names a model :func:`load_model` can load, without loading it (no weights, no
    network), and say what conditions it takes. ``py:`` factories are imported (not called); a diffusers model
    must be an existing folder or an ``organisation/name`` hub id. Raises ValueError / FileNotFoundError."""
    _dtype(dtype)
    if not isinstance(name, str) or not name:
        raise ValueError(f"expected a model name, got {name!r}")
    if name.startswith("tiny-"):
        if _tiny_family(name) != "dit":
            return ModelInfo("text")
        from ..testing import tiny_pipeline

        num_classes, names = _tiny_classes(tiny_pipeline("dit"))  # tiny: random weights, milliseconds
        return ModelInfo("class", num_classes, names)
    if name.startswith("zoo:"):
        import json

        from .. import zoo

        short = _zoo_name(name[len("zoo:"):])
        js = zoo.weights_paths(short)[1]
        meta = json.loads(js.read_text()) if js.is_file() else zoo.get_config(short)
        kind = meta.get("pipeline_class", "ClassConditionalPipeline")  # the table zoo.class_names follows
        if kind == "TextToVideoPipeline":
            names = [f"digit {d}" for d in range(10)]
        elif kind == "TextToImagePipeline":
            names = list(zoo.CIFAR10_CLASSES)
        else:
            names = list(meta.get("classes") or [str(i) for i in
                                                  range(int(meta["transformer"]["num_embeds_ada_norm"]))])
        return ModelInfo("class", len(names), names)
    if refs.is_ref(name):
        factory = refs.resolve(name, base_dir)
        if not callable(factory):
            raise ValueError(f"{name} is a {type(factory).__name__}, not a factory returning an EvalModel")
        return ModelInfo(None)
    from pathlib import Path

    if Path(name).is_dir() or HUB_ID.match(name):
        return ModelInfo("text")
    raise ValueError(f"unknown model {name!r}: expected tiny-FAMILY, zoo:NAME, py:MODULE_OR_FILE:FACTORY, an existing "
                     "diffusers pipeline folder or a hub id 'organisation/name'")


def load_model(name: str, kwargs: dict | None = None, device: torch.device | str = "cpu",
               dtype: str | torch.dtype | None = None, base_dir: str | None = None) -> EvalModel:
    """Load the model named by a spec string (see the module docstring)."""
    device = torch.device(device)
    kwargs = dict(kwargs or {})
    dtype = _dtype(dtype)
    if name.startswith("tiny-"):
        return _tiny(_tiny_family(name), device, dtype, kwargs)
    if name.startswith("zoo:"):
        return _zoo(name[len("zoo:"):], device, dtype, kwargs)
    if refs.is_ref(name):
        model = refs.resolve(name, base_dir)(device=device, dtype=dtype, **kwargs)
        if not isinstance(model, EvalModel):
            raise TypeError(f"{name} returned {type(model).__name__}, expected dit_accel.eval.models.EvalModel")
        return model
    return _pretrained(name, device, dtype, kwargs)


def as_images(output: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Images [N, 3, H, W] in [0, 1] for image metrics (video frames flattened); None for latents."""
    if kind == "image":
        return output.float().clamp(0, 1)
    if kind == "video":
        return output.float().clamp(0, 1).flatten(0, 1)
    return None
