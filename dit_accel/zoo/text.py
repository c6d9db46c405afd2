"""The reference models' own text side: a word-level tokenizer, a tiny CLIP-architecture text encoder, captions.

No pretrained text model fits an offline 16 MB budget, so the text-conditional reference models
(``cifar10_mmdit``, ``digits_wan``) learn their text encoder jointly with the transformer:

* tokenizer: ``tokenizers`` ``WordLevel`` over a closed vocabulary (``configs.VOCABULARIES``), lower-cased,
  punctuation dropped, ``[BOS] words [EOS]`` padded with ``[PAD]`` to ``max_text_length``; unknown words
  become ``[UNK]``; wrapped in ``transformers.PreTrainedTokenizerFast`` so pipelines use it like any HF tokenizer;
* encoder: ``transformers.CLIPTextModel`` with a small config (causal self-attention; the pooled output is
  the ``[EOS]`` token's state), trained from scratch;
* captions: CIFAR-10 class names with synonyms and templates ("a blurry photo of a kitten"), and
  moving-digits phrases ("a video of the digits 3 and seven moving").
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from .configs import (CAPTION_TEMPLATES, CIFAR10_CLASSES, CIFAR10_SYNONYMS, DIGIT_WORDS, VIDEO_TEMPLATES,
                      VOCABULARIES)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3; EOS must not be 2 (CLIP's legacy pooling)


def build_tokenizer(vocab: str | Sequence[str], max_length: int = 16):
    """A ``PreTrainedTokenizerFast`` over ``vocab`` (a name in ``VOCABULARIES`` or a word list)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = VOCABULARIES[vocab] if isinstance(vocab, str) else tuple(vocab)
    table = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        table.setdefault(w, len(table))
    tok = Tokenizer(WordLevel(table, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9\- ]"), " ")])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", table["[BOS]"]), ("[EOS]", table["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=max_length)


def build_text_encoder(config: dict, tokenizer):
    """A freshly initialised ``CLIPTextModel`` sized by ``config`` (``CLIPTextConfig`` kwargs)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         projection_dim=config["hidden_size"], **config)
    return CLIPTextModel(cfg)


def unknown_words(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Words of ``prompts`` outside the tokenizer's vocabulary (they become ``[UNK]``), in order, once each."""
    vocab = tokenizer.get_vocab()
    normalize = tokenizer.backend_tokenizer.normalizer.normalize_str
    words = [w for p in prompts for w in normalize(p).split()]
    return list(dict.fromkeys(w for w in words if w not in vocab))


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, L, D], pooled [B, D])`` of ``prompts``; all ``L = model_max_length`` positions are kept
    (the transformers see the padded sequence, as in training)."""
    device = torch.device(device) if device is not None else next(text_encoder.parameters()).device
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    out = text_encoder(input_ids=ids, return_dict=True)
    return out.last_hidden_state, out.pooler_output


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def cifar10_captions(label: int) -> list[str]:
    """Every caption of CIFAR-10 class ``label``: each template filled with each of the class's synonyms."""
    return [t.format(a=_article(w), x=w) for t in CAPTION_TEMPLATES for w in CIFAR10_SYNONYMS[CIFAR10_CLASSES[label]]]


def cifar10_caption(label: int, rng: random.Random) -> str:
    """A random caption of CIFAR-10 class ``label`` (uniform over :func:`cifar10_captions`)."""
    return rng.choice(cifar10_captions(label))


def cifar10_prompt(label: int | str) -> str:
    """The canonical prompt of a class: ``"a photo of a cat"`` (what FID samples and the demo use)."""
    name = CIFAR10_CLASSES[label] if isinstance(label, int) else label
    word = CIFAR10_SYNONYMS[name][0]
    return f"a photo of {_article(word)} {word}"


def _digit_names(digits: Sequence[int]) -> list[list[str]]:
    """Every way to name the digits: each as a numeral or a word ("3" / "three")."""
    names: list[list[str]] = [[]]
    for d in digits:
        names = [n + [form] for n in names for form in (str(d), DIGIT_WORDS[d])]
    return names


def _phrase(names: Sequence[str]) -> str:
    return f"the digit {names[0]}" if len(names) == 1 else "the digits " + " and ".join(names)


def digits_captions(digits: Sequence[int]) -> list[str]:
    """Every caption of a clip showing ``digits`` (in order of appearance): templates x numeral/word forms."""
    return [t.format(d=_phrase(n)) for t in VIDEO_TEMPLATES for n in _digit_names(digits)]


def digits_caption(digits: Sequence[int], rng: random.Random) -> str:
    """A random caption of a moving-digits clip (uniform over :func:`digits_captions`)."""
    return rng.choice(digits_captions(digits))


def digits_prompt(digits: Sequence[int]) -> str:
    """The canonical prompt of a clip: ``"the digits 3 and 7 bouncing"``."""
    return f"{_phrase([str(d) for d in digits])} bouncing"
