"""Configurations of the project's own reference models (see ``MODEL_CARD_*.md``).

This module is deliberately dependency-free (no torch / diffusers import) so that the training and
evaluation scripts can read it by path without importing the rest of :mod:`dit_accel`.
"""

from __future__ import annotations

import copy

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Each entry: everything needed to build the model + scheduler and to train it.
#   transformer: kwargs for diffusers.DiTTransformer2DModel(**kwargs)
#   scheduler:   kwargs for diffusers.FlowMatchEulerDiscreteScheduler(**kwargs)
#   prediction:  "flow_velocity": the network predicts v = noise - x0 for x_t = (1 - t) x0 + t noise,
#                called with timestep = 1000 * t (the FlowMatchEulerDiscreteScheduler convention)
#   null_class_id: label index of the "no class" embedding used for classifier-free guidance
#   train:       default hyper-parameters of scripts/train_reference.py
MODEL_CONFIGS: dict[str, dict] = {
    "cifar10_dit": {
        "description": "class-conditional DiT (adaLN-zero), CIFAR-10 32x32, pixel space, rectified flow",
        "transformer_class": "DiTTransformer2DModel",
        "transformer": {
            "num_attention_heads": 3,
            "attention_head_dim": 64,
            "in_channels": 3,
            "out_channels": 3,
            "num_layers": 10,
            "dropout": 0.0,
            "norm_num_groups": 32,
            "attention_bias": True,
            "sample_size": 32,
            "patch_size": 2,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 10,
            "upcast_attention": False,
            "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-5,
        },
        "scheduler_class": "FlowMatchEulerDiscreteScheduler",
        "scheduler": {"num_train_timesteps": 1000, "shift": 1.0},
        "prediction": "flow_velocity",
        "image_size": 32,
        "channels": 3,
        "classes": list(CIFAR10_CLASSES),
        "null_class_id": 10,
        "defaults": {"num_inference_steps": 50, "guidance_scale": 2.0},
        "train": {
            "batch_size": 512,
            "lr": 5e-4,
            "min_lr_frac": 0.02,
            "warmup_steps": 1000,
            "weight_decay": 0.0,
            "betas": [0.9, 0.99],
            "grad_clip": 1.0,
            "ema_decay": 0.9995,
            "label_dropout": 0.1,
            "t_sampling": "logit_normal",
            "hflip": True,
        },
    },
}


def get_config(name: str) -> dict:
    """A deep copy of the configuration of model ``name``."""
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown reference model {name!r}; known: {sorted(MODEL_CONFIGS)}")
    return copy.deepcopy(MODEL_CONFIGS[name])
