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

#: hyper-parameters shared by every reference model's training (``train`` overrides per model)
_TRAIN_DEFAULTS: dict = {
    "lr": 5e-4,
    "min_lr_frac": 0.02,
    "weight_decay": 0.0,
    "betas": [0.9, 0.99],
    "grad_clip": 1.0,
    "label_dropout": 0.1,
    "t_sampling": "logit_normal",
}

#: the text encoder of the text-conditional models: ``transformers.CLIPTextConfig`` kwargs (``vocab_size``
#: is set from the vocabulary), trained jointly with the transformer
_TEXT_ENCODER: dict = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "hidden_act": "gelu",
}

#: every reference model: pixel space, 32x32, rectified flow sampled with FlowMatchEulerDiscreteScheduler
_PIXEL_FLOW: dict = {
    "scheduler_class": "FlowMatchEulerDiscreteScheduler",
    "scheduler": {"num_train_timesteps": 1000, "shift": 1.0},
    "prediction": "flow_velocity",
    "image_size": 32,
}

#: the noise-prediction reference model: DDPM's linear schedule over 1000 training steps (as DiT-XL/2 and
#: PixArt-alpha), the network predicts the noise, sampled with deterministic DDIM (eta 0)
_PIXEL_DDPM: dict = {
    "scheduler_class": "DDIMScheduler",
    "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": True,
                  "timestep_spacing": "leading"},
    "prediction": "epsilon",
    "image_size": 32,
}

# Each entry: everything needed to build the model + scheduler and to train it.
#   transformer: kwargs for diffusers.DiTTransformer2DModel(**kwargs)
#   scheduler:   kwargs for diffusers.<scheduler_class>(**kwargs)
#   prediction:  "flow_velocity": the network predicts v = noise - x0 for x_t = (1 - t) x0 + t noise,
#                called with timestep = 1000 * t (the FlowMatchEulerDiscreteScheduler convention);
#                "epsilon": the network predicts the noise of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise,
#                called with the integer training timestep t in [0, 999] (DDPM / DDIM)
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
        **_PIXEL_FLOW,
        "channels": 3,
        "classes": list(CIFAR10_CLASSES),
        "null_class_id": 10,
        "defaults": {"num_inference_steps": 50, "guidance_scale": 2.0},
        "train": {**_TRAIN_DEFAULTS, "batch_size": 512, "warmup_steps": 1000, "ema_decay": 0.9995, "hflip": True},
    },
    "cifar10_dit_eps": {
        "description": "class-conditional DiT (adaLN-zero), CIFAR-10 32x32, pixel space, DDPM noise prediction "
                       "(linear betas, fixed variance), sampled with DDIM",
        "transformer_class": "DiTTransformer2DModel",
        "transformer": None,  # the same architecture as cifar10_dit (filled in below)
        **_PIXEL_DDPM,
        "channels": 3,
        "classes": list(CIFAR10_CLASSES),
        "null_class_id": 10,
        "defaults": {"num_inference_steps": 50, "guidance_scale": 2.0},
        "train": {**_TRAIN_DEFAULTS, "batch_size": 512, "warmup_steps": 1000, "ema_decay": 0.9995, "hflip": True,
                  "t_sampling": "uniform"},
    },
    "cifar10_mmdit": {
        "description": "text-conditional MM-DiT (SD3-style joint attention), CIFAR-10 32x32 with captions, "
                       "pixel space, rectified flow, own word-level tokenizer and text encoder",
        "pipeline_class": "TextToImagePipeline",
        "transformer_class": "SD3Transformer2DModel",
        "transformer": {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 3,
            "out_channels": 3,
            "num_layers": 6,
            "attention_head_dim": 64,
            "num_attention_heads": 3,
            "joint_attention_dim": 64,
            "caption_projection_dim": 192,
            "pooled_projection_dim": 64,
            "pos_embed_max_size": 16,
        },
        "text_encoder": dict(_TEXT_ENCODER),
        "vocab": "cifar10",
        "max_text_length": 16,
        **_PIXEL_FLOW,
        "channels": 3,
        "classes": list(CIFAR10_CLASSES),
        "defaults": {"num_inference_steps": 28, "guidance_scale": 2.0},
        "train": {**_TRAIN_DEFAULTS, "batch_size": 512, "warmup_steps": 1000, "ema_decay": 0.999, "hflip": True},
    },
    "digits_wan": {
        "description": "text-conditional video DiT (Wan 2.1-style: 3D patches, 3D RoPE, self- + cross-attention), "
                       "16-frame 32x32 clips of bouncing MNIST digits, pixel space, rectified flow",
        "pipeline_class": "TextToVideoPipeline",
        "transformer_class": "WanTransformer3DModel",
        "transformer": {
            "patch_size": [1, 2, 2],
            "num_attention_heads": 3,
            "attention_head_dim": 64,
            "in_channels": 1,
            "out_channels": 1,
            "text_dim": 64,
            "freq_dim": 256,
            "ffn_dim": 768,
            "num_layers": 8,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "rope_max_seq_len": 1024,
        },
        "text_encoder": dict(_TEXT_ENCODER),
        "vocab": "digits",
        "max_text_length": 16,
        **_PIXEL_FLOW,
        "num_frames": 16,
        "channels": 1,
        "video": {"digit_size": 14, "max_digits": 2},
        "defaults": {"num_inference_steps": 28, "guidance_scale": 3.0},
        "train": {**_TRAIN_DEFAULTS, "batch_size": 64, "warmup_steps": 500, "ema_decay": 0.999, "hflip": False},
    },
}

MODEL_CONFIGS["cifar10_dit_eps"]["transformer"] = dict(MODEL_CONFIGS["cifar10_dit"]["transformer"])


# --------------------------------------------------------------------------- captions and vocabularies
# The text-conditional models use a word-level tokenizer over a closed vocabulary built from these
# lists (see ``text.py``); words outside it map to ``[UNK]``.

#: synonyms per CIFAR-10 class, the first is the class name used in canonical prompts
CIFAR10_SYNONYMS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "plane", "aeroplane", "jet", "aircraft"),
    "automobile": ("car", "automobile", "sedan", "coupe"),
    "bird": ("bird", "songbird", "sparrow", "finch"),
    "cat": ("cat", "kitten", "kitty", "tabby"),
    "deer": ("deer", "fawn", "stag", "doe"),
    "dog": ("dog", "puppy", "pup", "hound"),
    "frog": ("frog", "toad", "bullfrog", "treefrog"),
    "horse": ("horse", "pony", "stallion", "mare"),
    "ship": ("ship", "boat", "vessel", "freighter"),
    "truck": ("truck", "lorry", "pickup", "van"),
}

#: caption templates; ``{a}`` is the article ("a"/"an") agreeing with ``{x}``
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {x}",
    "a picture of {a} {x}",
    "an image of {a} {x}",
    "a blurry photo of {a} {x}",
    "a small photo of the {x}",
    "a low resolution photo of {a} {x}",
    "a close-up photo of the {x}",
    "a cropped photo of {a} {x}",
    "a bright photo of {a} {x}",
    "a dark photo of the {x}",
    "a photo of the {x}",
    "{x}",
)

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: caption templates of the moving-digits videos; ``{d}`` is a phrase naming the digits in the clip
VIDEO_TEMPLATES: tuple[str, ...] = (
    "{d} bouncing",
    "a video of {d} moving",
    "{d} moving around",
    "{d}",
)


def _words(texts) -> list[str]:
    out: list[str] = []
    for t in texts:
        for w in t.replace("{a}", "").replace("{x}", "").replace("{d}", "").split():
            if w not in out:
                out.append(w)
    return out


CIFAR10_VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    _words(CAPTION_TEMPLATES) + ["a", "an"]
    + [w for syn in CIFAR10_SYNONYMS.values() for s in syn for w in s.split()]
))
DIGITS_VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    _words(VIDEO_TEMPLATES) + ["the", "digit", "digits", "and", "a"] + list(DIGIT_WORDS) + [str(i) for i in range(10)]
))
VOCABULARIES: dict[str, tuple[str, ...]] = {"cifar10": CIFAR10_VOCAB, "digits": DIGITS_VOCAB}


def get_config(name: str) -> dict:
    """A deep copy of the configuration of model ``name``."""
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown reference model {name!r}; known: {sorted(MODEL_CONFIGS)}")
    return copy.deepcopy(MODEL_CONFIGS[name])
