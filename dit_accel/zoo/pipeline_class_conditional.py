"""A small pixel-space, class-conditional diffusion pipeline for the project's reference models.

Runs fully offline: no VAE, no text encoder, nothing downloaded. The transformer is a
``diffusers.DiTTransformer2DModel`` trained with rectified flow (velocity prediction,
``FlowMatchEulerDiscreteScheduler``) or, ``cifar10_dit_eps``, with DDPM noise prediction (``DDIMScheduler``);
see ``configs.py``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .sampling import FlowSamplerMixin, to_output


class ClassConditionalPipeline(FlowSamplerMixin, DiffusionPipeline):
    r"""Class-conditional pixel-space generation with classifier-free guidance.

    Args:
        transformer: a class-conditional ``DiTTransformer2DModel`` (``num_embeds_ada_norm`` = number of classes;
            index ``num_classes`` is the "null" label used for the unconditional branch).
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (the network predicts the flow velocity) or
            ``DDIMScheduler`` (it predicts the noise); guidance combines either prediction the same way.
        labels: class names, in label-index order.

    Classifier-free guidance is batched: one transformer call per step on ``[uncond, cond]``
    (the first half of the batch carries the null label), as in ``diffusers.DiTPipeline``.
    """

    model_cpu_offload_seq = "transformer"
    fallback_defaults = {"num_inference_steps": 50, "guidance_scale": 2.0}

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler | DDIMScheduler,
        labels: Sequence[str] | None = None,
        null_class_id: int | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        n = int(transformer.config.num_embeds_ada_norm)
        names = list(labels) if labels is not None else [str(i) for i in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} labels given for a model with {n} classes")
        self.id2label = dict(enumerate(names))
        # name -> id, like DiTPipeline.labels
        self.labels = {name: i for i, name in enumerate(names)}
        self.null_class_id = n if null_class_id is None else int(null_class_id)
        self.defaults = dict(self.fallback_defaults)

    @property
    def num_classes(self) -> int:
        return len(self.id2label)

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Map class names (e.g. ``"cat"``) to label ids."""
        if isinstance(label, str):
            label = [label]
        out = []
        for name in label:
            if name not in self.labels:
                raise ValueError(f"{name!r} is not a class of this model; classes: {list(self.labels)}")
            out.append(self.labels[name])
        return out

    def _label_tensor(self, class_labels, device) -> torch.Tensor:
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            ids = class_labels.reshape(-1).to(device=device, dtype=torch.long)
        else:
            ids = [self.labels[c] if isinstance(c, str) else int(c) for c in class_labels]
            ids = torch.tensor(ids, device=device, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("class_labels is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_classes:
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}]")
        return ids

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per entry of ``class_labels``.

        Args:
            class_labels: label ids or class names (see ``pipe.labels``).
            num_inference_steps: sampler steps (Euler for flow models, DDIM for ``cifar10_dit_eps``; default:
                ``pipe.defaults``, else 50).
            guidance_scale: classifier-free guidance scale ``w``: ``v = v_u + w (v_c - v_u)`` (``v`` the
                network's prediction);
                ``w <= 1`` runs the conditional branch alone (default: ``pipe.defaults``, else 2.0).
            generator: ``torch.Generator`` (or list, one per image) for the initial noise.
            latents: initial noise ``(B, C, H, W)``; drawn from ``generator`` if ``None``.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (``B x H x W x C`` float in [0, 1]),
                ``"pt"`` (``B x C x H x W`` float tensor in [0, 1]) or ``"raw"`` (model space, about [-1, 1]).
            callback_on_step_end: optional ``fn(pipe, step_index, timestep, {"latents": x}) -> dict``.
            height, width: image size (default: the training size ``sample_size``; multiples of the patch size,
                other sizes are out of distribution).
        """
        num_inference_steps, guidance_scale = self._settings(num_inference_steps, guidance_scale)
        device = self._execution_device
        tr = self.transformer
        labels = self._label_tensor(class_labels, device)
        size, channels = int(tr.config.sample_size), int(tr.config.in_channels)
        latents = self._initial((labels.shape[0], channels, height or size, width or size), generator, latents,
                                device, tr.dtype)
        null = torch.full_like(labels, self.null_class_id)
        labels_cfg = torch.cat([null, labels], 0)

        def velocity(x: torch.Tensor, t: torch.Tensor, cfg: bool) -> torch.Tensor:
            x_in = torch.cat([x, x], 0) if cfg else x
            v = tr(x_in, timestep=t.expand(x_in.shape[0]).to(device=x.device),
                   class_labels=labels_cfg if cfg else labels, return_dict=False)[0]
            if not cfg:
                return v
            v_u, v_c = v.chunk(2, dim=0)
            return v_u + guidance_scale * (v_c - v_u)

        latents = self._sample(latents, num_inference_steps, guidance_scale, velocity, callback_on_step_end)
        images = self.postprocess(latents, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def postprocess(x: torch.Tensor, output_type: str = "pil"):
        """Model space (about [-1, 1], ``B x C x H x W``) -> ``output_type`` (``raw``, ``pt``, ``np``, ``pil``)."""
        return to_output(x, output_type)
