"""Tiny offline diffusers pipelines of every tier-1 family, for tests, demos and notebooks.

Everything here is built from configs with random weights under a fixed seed: nothing calls
``from_pretrained`` or touches the network, and the same seed gives bit-identical weights and outputs.

    >>> from dit_accel.testing import tiny_pipeline, tiny_call_kwargs
    >>> pipe = tiny_pipeline("flux")
    >>> latents = pipe(**tiny_call_kwargs("flux")).images

Tokenizers are built locally with the ``tokenizers`` library: a word-level model over a small lowercase
vocabulary (single letters, digits, punctuation and ~280 common prompt words; anything else maps
to ``<unk>``), wrapped in :class:`transformers.PreTrainedTokenizerFast`. The CLIP-style tokenizer adds
``<s> ... </s>``, the T5-style one appends ``</s>``, the Llama-style one prepends ``<s>``; ``<pad>`` pads on
the right. Text encoders use ``bos_token_id=3``, ``eos_token_id=1``, ``pad_token_id=0`` to match.

Sizes are chosen so a 4-step call takes milliseconds on CPU while every family still sees a 2x2 grid of
image tokens per (latent) frame at least, and video families at least two latent frames.
"""

from __future__ import annotations

import contextlib
import functools
import string
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedTokenizerFast

__all__ = ["FAMILIES", "CFG_LAYOUT", "tiny_transformer", "tiny_pipeline", "tiny_call_kwargs", "tiny_generate"]

FAMILIES: tuple[str, ...] = ("flux", "sd3", "pixart", "dit", "wan", "hunyuan_video", "cogvideox")

# How classifier-free guidance runs in one call made with ``tiny_call_kwargs(family)``:
# "batched": uncond and cond rows stacked into one transformer call per step (guidance_scale > 1);
# "separate": one cond call and one uncond call per step; "none": one cond call per step (Flux is
# guidance-distilled: the guidance scale is an embedding input, not a second pass).
# Note DiT stacks [cond, uncond] (class labels, then the null class); the others stack [uncond, cond].
CFG_LAYOUT: dict[str, str] = {
    "flux": "none",
    "sd3": "batched",
    "pixart": "batched",
    "dit": "batched",
    "wan": "separate",
    "hunyuan_video": "separate",
    "cogvideox": "batched",
}

# Prompt length (tokens) of the T5 / UMT5 / Llama encoders in tiny calls. CogVideoX's transformer bakes
# its text length into its positional embedding, so it is built with this ``max_text_seq_length``.
TEXT_LEN = 16
CLIP_LEN = 77  # CLIP length; HunyuanVideo hard-codes 77, the others read ``tokenizer.model_max_length``
PROMPT = "a photo of a cat"
NEGATIVE_PROMPT = "blurry, low quality"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build under ``torch.manual_seed(seed)`` in float32, restoring the global RNG and default dtype."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported families: {', '.join(FAMILIES)}")


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------

_SPECIAL = ("<pad>", "</s>", "<unk>", "<s>")
_PAD_ID, _EOS_ID, _BOS_ID = 0, 1, 3  # positions in _SPECIAL
_LLAMA_HEADERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")  # HunyuanVideo template tokens
_WORDS = """
a an the of and or in on at by to for from with without into over under near behind is are it its this
that photo picture image video film clip shot scene frame painting drawing sketch render portrait
landscape closeup close up view wide angle cinematic camera lens light lighting shadow cat cats dog dogs
bird fish horse cow lion tiger bear fox rabbit panda owl car bus train boat ship plane bicycle robot
astronaut dragon castle house building tower bridge road street city town village forest tree trees
flower flowers garden grass field mountain mountains hill river lake sea ocean beach island desert snow
rain sky cloud clouds sun sunset sunrise moon star stars space planet galaxy fire water ice stone rock
wood metal glass night day morning evening winter summer spring autumn red green blue yellow orange
purple pink brown black white gray grey gold golden silver big small large tiny tall short long old
young new happy sad cute beautiful ugly dark bright colorful vivid soft sharp detailed realistic
photorealistic abstract fantasy futuristic vintage style art oil watercolor digital 3d high low quality
resolution 4k 8k hd best worst bad blurry noisy distorted deformed man woman person people child boy
girl baby family friends crowd face eyes hair hand hands sitting standing running walking flying
swimming jumping dancing playing eating sleeping reading riding looking smiling holding wearing hat
table chair window door book cup food apple bread cake describe detailing following aspects main
content theme shape size texture quantity text spatial relationships objects actions events behaviors
temporal physical movement movements changes background environment atmosphere angles transitions used
system user assistant slow motion fast moving
"""


@functools.lru_cache(maxsize=None)
def _vocab() -> tuple[str, ...]:
    """The shared tiny vocabulary: special tokens, then characters, then words (no duplicates)."""
    tokens = [*_SPECIAL, *_LLAMA_HEADERS, *string.ascii_lowercase, *string.digits, *string.punctuation]
    tokens += _WORDS.split()
    return tuple(dict.fromkeys(tokens))


def _tokenizer(style: str, model_max_length: int) -> "PreTrainedTokenizerFast":
    """A word-level fast tokenizer over :func:`_vocab`; ``style`` picks the special-token template.

    ``"clip"``: ``<s> text </s>``, ``"t5"``: ``text </s>``, ``"llama"``: ``<s> text``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    templates = {"clip": "<s> $A </s>", "t5": "$A </s>", "llama": "<s> $A"}
    if style not in templates:
        raise ValueError(f"unknown tokenizer style {style!r}")
    vocab = {tok: i for i, tok in enumerate(_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and each punctuation mark
    tok.decoder = decoders.WordPiece()  # joins words with spaces, glues punctuation back
    tok.add_special_tokens(list(_SPECIAL + _LLAMA_HEADERS))
    tok.post_processor = processors.TemplateProcessing(
        single=templates[style], special_tokens=[("<s>", _BOS_ID), ("</s>", _EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
    )


# ---------------------------------------------------------------------------------------------------
# Text encoders and shared helpers
# ---------------------------------------------------------------------------------------------------

_TOKEN_IDS = dict(pad_token_id=_PAD_ID, bos_token_id=_BOS_ID, eos_token_id=_EOS_ID)


def _clip(hidden: int = 16, projection: int | None = None) -> torch.nn.Module:
    """CLIPTextModel, or CLIPTextModelWithProjection when ``projection`` is given (2 layers, 2 heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LEN,
        projection_dim=projection or hidden,
        **_TOKEN_IDS,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(d_model: int = 32, umt5: bool = False) -> torch.nn.Module:
    """T5EncoderModel (or UMT5EncoderModel): 2 layers, 2 heads of 8, relative-position buckets."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(_vocab()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        **_TOKEN_IDS,
    )
    return model_cls(config)


def _llama(hidden: int = 16) -> torch.nn.Module:
    """LlamaModel with 3 layers (HunyuanVideo reads ``hidden_states[-3]``), 2 heads of 8."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden // 2,
        max_position_embeddings=1024,
        **_TOKEN_IDS,
    )
    return LlamaModel(config)


_NO_QUANT_CONV = dict(use_quant_conv=False, use_post_quant_conv=False)  # Flux / SD3 VAEs have none


def _vae_kl(**config: Any) -> torch.nn.Module:
    """2-level AutoencoderKL for the image families: spatial factor 2, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **config,
    )


@functools.lru_cache(maxsize=None)
def _hunyuan_prompt_template() -> dict[str, Any]:
    """A short Llama chat template for HunyuanVideo with ``crop_start`` counted by the tiny tokenizer.

    The pipeline's default template hard-codes ``crop_start=95`` (the real Llama-3 token count of its
    system prefix); our tokenizer counts differently, so tiny calls pass this template instead.
    """
    template = (
        "<|start_header_id|>system<|end_header_id|>\n\ndescribe the video.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    )
    prefix = template.split("{}")[0]
    crop_start = len(_tokenizer("llama", 1024)(prefix)["input_ids"])
    return {"template": template, "crop_start": crop_start}


# ---------------------------------------------------------------------------------------------------
# Transformers
# ---------------------------------------------------------------------------------------------------


def _flux_transformer() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=16,  # CLIP hidden size
        guidance_embeds=True,  # guidance-distilled, like FLUX.1-dev
        axes_dims_rope=(4, 6, 6),
    )


def _sd3_transformer() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model (CLIP states are padded up to it)
        caption_projection_dim=16,  # = inner dim
        pooled_projection_dim=32,  # 2 CLIP projections of 16
        out_channels=4,
        pos_embed_max_size=16,
    )


def _pixart_transformer() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=4,
        cross_attention_dim=16,  # = inner dim (captions are projected to it)
        caption_channels=32,  # T5 d_model
        sample_size=8,
        patch_size=2,
    )


def _dit_transformer() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=4,
        sample_size=8,
        patch_size=2,
    )


def _wan_transformer() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits it 4/4/4 over (t, h, w)
        in_channels=16,
        out_channels=16,
        text_dim=32,  # UMT5 d_model
        freq_dim=32,
        ffn_dim=48,
        num_layers=4,
        rope_max_seq_len=32,
    )


def _hunyuan_video_transformer() -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,  # Llama hidden size
        pooled_projection_dim=16,  # CLIP hidden size
        rope_axes_dim=(4, 4, 4),
    )


def _cogvideox_transformer() -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,  # T5 d_model
        num_layers=4,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
    )


_TRANSFORMERS: dict[str, Callable[[], torch.nn.Module]] = {
    "flux": _flux_transformer,
    "sd3": _sd3_transformer,
    "pixart": _pixart_transformer,
    "dit": _dit_transformer,
    "wan": _wan_transformer,
    "hunyuan_video": _hunyuan_video_transformer,
    "cogvideox": _cogvideox_transformer,
}


def _reinit_zero_weights(module: torch.nn.Module, std: float = 0.02) -> None:
    """Give every all-zero parameter outside normalisation layers small random normal values.

    Zero-initialised adaLN modulations, gates or output projections would make a model's output
    independent of its blocks; none of the current diffusers tier-1 transformers zero-initialise (only
    LayerNorm biases start at zero, and are left alone), but this keeps the guarantee if a future version
    does. Uses the current RNG.
    """
    with torch.no_grad():
        for submodule in module.modules():
            if "Norm" in type(submodule).__name__:
                continue
            for param in submodule.parameters(recurse=False):
                if param.is_floating_point() and param.numel() and not param.any():
                    param.normal_(0.0, std)


def tiny_transformer(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's diffusers transformer from a tiny config, random weights under ``manual_seed(seed)``.

    float32, eval mode, at least 4 blocks (Flux and HunyuanVideo: 2 double-stream ``transformer_blocks``
    and 2 ``single_transformer_blocks``), 2 heads of 8-16 channels. Any non-normalisation parameter left
    all-zero by the model's init (adaLN-zero modulations, gates, zero output layers) is re-initialised
    with small random normal values under the same seed, so the output always depends on every block
    (today no tier-1 model needs it). The global RNG state is left unchanged.
    """
    _check_family(family)
    with _seeded(seed):
        model = _TRANSFORMERS[family]()
        _reinit_zero_weights(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------


def _flux_pipeline(transformer: torch.nn.Module) -> "DiffusionPipeline":
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),  # resolution-dependent shift
        vae=_vae_kl(shift_factor=0.0609, scaling_factor=1.5035, **_NO_QUANT_CONV),
        text_encoder=_clip(16),
        tokenizer=_tokenizer("clip", CLIP_LEN),
        text_encoder_2=_t5(32),
        tokenizer_2=_tokenizer("t5", 512),
        transformer=transformer,
    )


def _sd3_pipeline(transformer: torch.nn.Module) -> "DiffusionPipeline":
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(shift_factor=0.0609, scaling_factor=1.5305, **_NO_QUANT_CONV),
        text_encoder=_clip(16, projection=16),
        tokenizer=_tokenizer("clip", CLIP_LEN),
        text_encoder_2=_clip(16, projection=16),
        tokenizer_2=_tokenizer("clip", CLIP_LEN),
        text_encoder_3=_t5(32),
        tokenizer_3=_tokenizer("t5", 512),
    )


def _pixart_pipeline(transformer: torch.nn.Module) -> "DiffusionPipeline":
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    return PixArtAlphaPipeline(
        tokenizer=_tokenizer("t5", 512),
        text_encoder=_t5(32),
        vae=_vae_kl(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _dit_pipeline(transformer: torch.nn.Module) -> "DiffusionPipeline":
    from diffusers import DDIMScheduler, DiTPipeline

    labels = ("tench", "goldfish", "white shark", "tiger shark", "hammerhead", "cat", "dog")
    return DiTPipeline(
        transformer=transformer,
        vae=_vae_kl(),
        scheduler=DDIMScheduler(),
        id2label=dict(enumerate(labels)),
    )


def _wan_pipeline(transformer: torch.nn.Module) -> "DiffusionPipeline":
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = AutoencoderKLWan(  # real Wan 2.1 compression: 8x spatial, 4x temporal, 16 latent channels
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return WanPipeline(
        tokenizer=_tokenizer("t5", 512),
        text_encoder=_t5(32, umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
    )


def _hunyuan_video_pipeline(transformer: torch.nn.Module) -> "DiffusionPipeline":
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    vae = AutoencoderKLHunyuanVideo(  # 8x spatial, 4x temporal (4 levels), 4 latent channels
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=_llama(16),
        tokenizer=_tokenizer("llama", 1024),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip(16),
        tokenizer_2=_tokenizer("clip", CLIP_LEN),
    )


def _cogvideox_pipeline(transformer: torch.nn.Module) -> "DiffusionPipeline":
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    vae = AutoencoderKLCogVideoX(  # 8x spatial (4 levels), 4x temporal, 4 latent channels
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=_tokenizer("t5", 512),
        text_encoder=_t5(32),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


_PIPELINES: dict[str, Callable[[torch.nn.Module], "DiffusionPipeline"]] = {
    "flux": _flux_pipeline,
    "sd3": _sd3_pipeline,
    "pixart": _pixart_pipeline,
    "dit": _dit_pipeline,
    "wan": _wan_pipeline,
    "hunyuan_video": _hunyuan_video_pipeline,
    "cogvideox": _cogvideox_pipeline,
}


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
    _check_family(family)
    transformer = tiny_transformer(family, seed)
    with _seeded(seed + 1):  # the other components: a stream distinct from the transformer's
        pipe = _PIPELINES[family](transformer)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built on CPU in float32 already; `.to(dtype)` would only add warnings
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Call arguments
# ---------------------------------------------------------------------------------------------------

# Smallest sizes that give each family >= 2x2 image tokens per (latent) frame and >= 2 latent frames:
# Flux/SD3/PixArt: 16 px / VAE 2 / patch 2 -> 4x4 tokens; DiT: sample_size 8 latent -> 4x4 tokens;
# Wan/HunyuanVideo/CogVideoX: 32 px / VAE 8 / patch 2 -> 2x2 tokens; Wan/HunyuanVideo: 5 frames -> 2
# latent frames; CogVideoX: 9 frames -> 3 latent frames (its VAE decodes an odd latent count to 4k + 1).
_FAMILY_KWARGS: dict[str, Callable[[], dict[str, Any]]] = {
    "flux": lambda: dict(height=16, width=16, guidance_scale=3.5, max_sequence_length=TEXT_LEN),
    "sd3": lambda: dict(height=16, width=16, guidance_scale=5.0, max_sequence_length=TEXT_LEN),
    "pixart": lambda: dict(
        height=16,
        width=16,
        guidance_scale=4.5,
        max_sequence_length=TEXT_LEN,
        use_resolution_binning=False,  # binning only knows sample sizes 32/64/128
        clean_caption=False,  # needs bs4 + ftfy
    ),
    "dit": lambda: dict(class_labels=[1], guidance_scale=4.0, output_type="pt"),  # DiT always decodes
    "wan": lambda: dict(
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=5.0,
        negative_prompt=NEGATIVE_PROMPT,
        max_sequence_length=TEXT_LEN,
    ),
    "hunyuan_video": lambda: dict(
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=6.0,  # embedded (distilled) guidance
        true_cfg_scale=2.0,
        negative_prompt=NEGATIVE_PROMPT,
        prompt_template=dict(_hunyuan_prompt_template()),
        max_sequence_length=TEXT_LEN,
    ),
    "cogvideox": lambda: dict(  # CogVideoX wants 8N + 1 frames (odd latent count) to decode cleanly
        height=32, width=32, num_frames=9, guidance_scale=6.0, max_sequence_length=TEXT_LEN
    ),
}


def tiny_call_kwargs(family: str, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for one small ``pipe(**kwargs)`` call of :func:`tiny_pipeline` (family).

    A short prompt (class labels for DiT), ``num_inference_steps=4``, the smallest sizes that keep a
    2x2 token grid (and >= 2 latent frames for video), a ``torch.Generator("cpu").manual_seed(seed)``,
    ``output_type="latent"`` (``"pt"`` for DiT, which always decodes), ``max_sequence_length=16`` and
    classifier-free guidance in the family's natural layout (see :data:`CFG_LAYOUT`). ``overrides`` are
    merged last; when they pass a list ``prompt`` the default negative prompt (Wan, HunyuanVideo) is
    repeated to the same length, since HunyuanVideo does not broadcast it.
    """
    _check_family(family)
    kwargs: dict[str, Any] = {} if family == "dit" else {"prompt": PROMPT, "output_type": "latent"}
    kwargs.update(num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(seed))
    kwargs.update(_FAMILY_KWARGS[family]())
    prompt = overrides.get("prompt")
    if isinstance(prompt, list) and "negative_prompt" in kwargs and "negative_prompt" not in overrides:
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompt)
    kwargs.update(overrides)
    return kwargs


def tiny_generate(pipe: "DiffusionPipeline", family: str, seed: int = 0, **overrides: Any) -> torch.Tensor:
    """One call of a tiny pipeline with ``tiny_call_kwargs``; the images, latents or frames as a float tensor."""
    out = pipe(**tiny_call_kwargs(family, seed=seed, **overrides))
    return (out.frames if hasattr(out, "frames") else out.images).float()
