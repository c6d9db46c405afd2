"""Shared parts of the tiny pipelines: seeded construction, tokenizers, text encoders, VAEs.

Tokenizers are built locally with the ``tokenizers`` library: a word-level model over a small lowercase
vocabulary (single letters, digits, punctuation and ~280 common prompt words; anything else maps
to ``<unk>``), wrapped in :class:`transformers.PreTrainedTokenizerFast`. The CLIP-style tokenizer adds
``<s> ... </s>``, the T5-style one appends ``</s>``, the Llama-style one prepends ``<s>``; ``<pad>`` pads on
the right. Text encoders use ``bos_token_id=3``, ``eos_token_id=1``, ``pad_token_id=0`` to match.

Nothing here imports torch, diffusers or transformers at module import (each helper imports what it
builds), so ``dit_accel.testing.FAMILIES`` is cheap to read (the command line's help lists it).
"""

from __future__ import annotations

import contextlib
import functools
import string
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerFast

__all__ = ["CLIP_LEN", "NEGATIVE_PROMPT", "PROMPT", "TEXT_LEN", "clip_text_encoder", "kl_vae", "llama_text_encoder",
           "seeded", "t5_text_encoder", "text_embeds", "tokenizer", "vocab"]

# Prompt length (tokens) of the T5 / UMT5 / Llama encoders in tiny calls. CogVideoX's transformer bakes
# its text length into its positional embedding, so it is built with this ``max_text_seq_length``.
TEXT_LEN = 16
CLIP_LEN = 77  # CLIP length; HunyuanVideo hard-codes 77, the others read ``tokenizer.model_max_length``
PROMPT = "a photo of a cat"
NEGATIVE_PROMPT = "blurry, low quality"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build under ``torch.manual_seed(seed)`` in float32, restoring the global RNG and default dtype."""
    import torch

    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------

_SPECIAL = ("<pad>", "</s>", "<unk>", "<s>")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 3  # positions in _SPECIAL
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
def vocab() -> tuple[str, ...]:
    """The shared tiny vocabulary: special tokens, then characters, then words (no duplicates)."""
    tokens = [*_SPECIAL, *_LLAMA_HEADERS, *string.ascii_lowercase, *string.digits, *string.punctuation]
    tokens += _WORDS.split()
    return tuple(dict.fromkeys(tokens))


def tokenizer(style: str, model_max_length: int) -> "PreTrainedTokenizerFast":
    """A word-level fast tokenizer over :func:`vocab`; ``style`` picks the special-token template.

    ``"clip"``: ``<s> text </s>``, ``"t5"``: ``text </s>``, ``"llama"``: ``<s> text``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    templates = {"clip": "<s> $A </s>", "t5": "$A </s>", "llama": "<s> $A"}
    if style not in templates:
        raise ValueError(f"unknown tokenizer style {style!r}")
    ids = {tok: i for i, tok in enumerate(vocab())}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and each punctuation mark
    tok.decoder = decoders.WordPiece()  # joins words with spaces, glues punctuation back
    tok.add_special_tokens(list(_SPECIAL + _LLAMA_HEADERS))
    tok.post_processor = processors.TemplateProcessing(
        single=templates[style], special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
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
# Text encoders
# ---------------------------------------------------------------------------------------------------

_TOKEN_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def clip_text_encoder(hidden: int = 16, projection: int | None = None) -> "torch.nn.Module":
    """CLIPTextModel, or CLIPTextModelWithProjection when ``projection`` is given (2 layers, 2 heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LEN,
        projection_dim=projection or hidden,
        **_TOKEN_IDS,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_text_encoder(d_model: int = 32, umt5: bool = False) -> "torch.nn.Module":
    """T5EncoderModel (or UMT5EncoderModel): 2 layers, 2 heads of 8, relative-position buckets."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(vocab()),
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


def llama_text_encoder(hidden: int = 16) -> "torch.nn.Module":
    """LlamaModel with 3 layers (HunyuanVideo reads ``hidden_states[-3]``), 2 heads of 8."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(vocab()),
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


def text_embeds(dim: int, tokens: int = TEXT_LEN, batch: int = 1, seed: int = 0) -> "torch.Tensor":
    """Seeded random text-encoder states [batch, tokens, dim] for the ``prompt_embeds`` families.

    Row ``i`` comes from seed ``seed + i`` (its own generator: the global RNG is untouched), so a batch of two
    starts with the single-row embedding of the same seed.
    """
    import torch

    rows = [torch.randn(1, tokens, dim, generator=torch.Generator("cpu").manual_seed(seed + i)) for i in range(batch)]
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------------
# VAEs
# ---------------------------------------------------------------------------------------------------

NO_QUANT_CONV = dict(use_quant_conv=False, use_post_quant_conv=False)  # Flux / SD3 VAEs have none


def kl_vae(**config: Any) -> "torch.nn.Module":
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


# The names these had in dit_accel/testing.py.
_seeded, _tokenizer = seeded, tokenizer
