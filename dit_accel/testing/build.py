"""``tiny_transformer``, ``tiny_pipeline``, ``tiny_call_kwargs``, ``tiny_generate``: the registered families
(:mod:`dit_accel.testing.families`) built and called the same way for every family."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .components import PROMPT, seeded
from .registry import get_family

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import DiffusionPipeline

__all__ = ["tiny_call_kwargs", "tiny_generate", "tiny_pipeline", "tiny_transformer"]

STEPS = 4  # num_inference_steps of a tiny call


def _reinit_zero_weights(module: "torch.nn.Module", std: float = 0.02) -> None:
    """Give every all-zero parameter outside normalisation layers small random normal values.

    Zero-initialised adaLN modulations, gates or output projections would make a model's output
    independent of its blocks; none of the current diffusers tier-1 transformers zero-initialise (only
    LayerNorm biases start at zero, and are left alone), but this keeps the guarantee if a future version
    does. Uses the current RNG.
    """
    import torch

    with torch.no_grad():
        for submodule in module.modules():
            if "Norm" in type(submodule).__name__:
                continue
            for param in submodule.parameters(recurse=False):
                if param.is_floating_point() and param.numel() and not param.any():
                    param.normal_(0.0, std)


def tiny_transformer(family: str, seed: int = 0) -> "torch.nn.Module":
    """The family's diffusers transformer from a tiny config, random weights under ``manual_seed(seed)``.

    float32, eval mode, at least 4 blocks (Flux and HunyuanVideo: 2 double-stream ``transformer_blocks``
    and 2 ``single_transformer_blocks``), 2 heads of 8-16 channels. Any non-normalisation parameter left
    all-zero by the model's init (adaLN-zero modulations, gates, zero output layers) is re-initialised
    with small random normal values under the same seed, so the output always depends on every block
    (today no tier-1 model needs it). The global RNG state is left unchanged.
    """
    record = get_family(family)
    with seeded(seed):
        model = record.transformer()
        _reinit_zero_weights(model)
    return model.eval()


def tiny_pipeline(family: str, seed: int = 0) -> "DiffusionPipeline":
    """The family's real diffusers pipeline class around :func:`tiny_transformer`, built offline.

    FluxPipeline, StableDiffusion3Pipeline, PixArtAlphaPipeline, DiTPipeline, WanPipeline,
    HunyuanVideoPipeline, CogVideoXPipeline with tiny VAEs of the family's AutoencoderKL* class, tiny
    CLIP / T5 / UMT5 / Llama text encoders, locally built word-level tokenizers and the family's default
    scheduler class. All weights come from ``seed`` (the global RNG state is left unchanged); the
    pipeline is on CPU, float32, eval mode, with the progress bar disabled.

    Call it with :func:`tiny_call_kwargs`. Calls that skip it must still pass
    ``max_sequence_length=16`` to CogVideoX (its transformer is built for 16 text tokens) and
    ``use_resolution_binning=False`` to PixArt; HunyuanVideo runs with its default prompt template, but
    that template's hard-coded ``crop_start=95`` then cuts the first 3 prompt tokens (our tokenizer counts
    92 template tokens), so tiny calls pass a short template with a matching ``crop_start``.
    """
    import torch

    record = get_family(family)
    transformer = tiny_transformer(family, seed)
    with seeded(seed + 1):  # the other components: a stream distinct from the transformer's
        pipe = record.pipeline(transformer)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built on CPU in float32 already; `.to(dtype)` would only add warnings
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for one small ``pipe(**kwargs)`` call of :func:`tiny_pipeline` (family).

    A short prompt (class labels for DiT, seeded text embeddings for ``prompt_embeds`` families),
    ``num_inference_steps=4``, the smallest sizes that keep a
    2x2 token grid (and >= 2 latent frames for video), a ``torch.Generator("cpu").manual_seed(seed)``,
    ``output_type="latent"`` (``"pt"`` for DiT, which always decodes), ``max_sequence_length=16`` and
    classifier-free guidance in the family's natural layout (see :data:`CFG_LAYOUT`). ``overrides`` are
    merged last; when they pass a list ``prompt`` the default negative prompt (Wan, HunyuanVideo) is
    repeated to the same length, since HunyuanVideo does not broadcast it.
    """
    import torch

    record = get_family(family)
    if record.class_labels:
        kwargs: dict[str, Any] = {}
    elif record.prompt_embeds:  # the record's call_kwargs give seeded text embeddings instead of a prompt
        kwargs = {"output_type": "latent"}
    else:
        kwargs = {"prompt": PROMPT, "output_type": "latent"}
    kwargs.update(num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(seed))
    kwargs.update(record.call_kwargs())
    prompt = overrides.get("prompt")
    if isinstance(prompt, list) and "negative_prompt" in kwargs and "negative_prompt" not in overrides:
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompt)
    kwargs.update(overrides)
    return kwargs


def tiny_generate(pipe: "DiffusionPipeline", family: str, seed: int = 0, **overrides: Any) -> "torch.Tensor":
    """One call of a tiny pipeline with ``tiny_call_kwargs``; the images, latents or frames as a float tensor."""
    out = pipe(**tiny_call_kwargs(family, seed=seed, **overrides))
    return (out.frames if hasattr(out, "frames") else out.images).float()
