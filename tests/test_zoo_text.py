"""CPU tests of the text-conditional reference models (``cifar10_mmdit``, ``digits_wan``), their tokenizer, text
encoder, captions and the moving-digits generator."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dit_accel import zoo  # noqa: E402
from dit_accel.adapters import get_adapter  # noqa: E402
from dit_accel.zoo import configs, text  # noqa: E402
from dit_accel.zoo.moving_digits import MovingDigits  # noqa: E402

TEXT_MODELS = ("cifar10_mmdit", "digits_wan")


@pytest.fixture(scope="module")
def mmdit():
    return zoo.load("cifar10_mmdit")


@pytest.fixture(scope="module")
def wan():
    return zoo.load("digits_wan")


# ----------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_weights_present_small_and_matching_config(name):
    assert name in zoo.available()
    st, js = zoo.weights_paths(name)
    assert st.stat().st_size <= 16_000_000, "weights file must stay <= 16 MB"
    meta = json.loads(js.read_text())
    cfg = zoo.get_config(name)
    for key in ("transformer", "text_encoder", "vocab", "scheduler", "pipeline_class", "transformer_class"):
        assert meta[key] == cfg[key], key
    assert meta["evaluation"]["model_card"].endswith(f"MODEL_CARD_{name}.md")


def test_mmdit_card_reports_fid():
    meta = json.loads(zoo.weights_paths("cifar10_mmdit")[1].read_text())
    rows = meta["evaluation"]["cfg_sweep_bf16_autocast"]
    default = [r for r in rows if r["guidance_scale"] == meta["defaults"]["guidance_scale"]]
    assert default and default[0]["fid"] < 50
    assert default[0]["fid"] == min(r["fid"] for r in rows), "the default guidance scale is the best measured one"


# ----------------------------------------------------------------------------------------------- text side


def test_tokenizer_words_special_tokens_and_unknowns():
    tok = text.build_tokenizer("cifar10", 16)
    ids = tok("A Photo of a CAT!", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16
    assert ids[0] == tok.bos_token_id and ids[6] == tok.eos_token_id and ids[7:] == [tok.pad_token_id] * 9
    assert tok.decode(ids[1:6]) == "a photo of a cat"
    assert tok.eos_token_id != 2, "CLIP pools the argmax token when eos_token_id == 2 (legacy path)"
    assert tok("zebra").input_ids[1] == tok.unk_token_id
    long = " ".join(["cat"] * 40)
    assert len(tok(long, truncation=True, max_length=16).input_ids) == 16


@pytest.mark.parametrize("vocab,captions", [
    ("cifar10", [c for label in range(10) for c in text.cifar10_captions(label)]),
    ("digits", [c for d in range(10) for c in text.digits_captions([d])]
               + [c for d in range(10) for c in text.digits_captions([d, 9 - d])]),
])
def test_every_training_caption_is_in_vocabulary(vocab, captions):
    tok = text.build_tokenizer(vocab, 16)
    ids = tok(captions, truncation=True, max_length=16).input_ids
    assert all(tok.unk_token_id not in row for row in ids)
    assert all(row[-1] == tok.eos_token_id for row in ids), "no caption may be truncated"


def test_captions_and_prompts():
    assert text.cifar10_prompt(0) == "a photo of an airplane" and text.cifar10_prompt("cat") == "a photo of a cat"
    assert set(text.cifar10_captions(3)) >= {"a photo of a kitten", "an image of a cat", "tabby"}
    assert text.digits_prompt([3, 7]) == "the digits 3 and 7 bouncing"
    assert "a video of the digits three and 7 moving" in text.digits_captions([3, 7])
    rng = random.Random(0)
    assert text.cifar10_caption(8, rng) in text.cifar10_captions(8)


# ----------------------------------------------------------------------------------------------- moving digits


def test_moving_digits_bounce_inside_canvas_and_labels():
    images = np.zeros((10, 28, 28), np.uint8)
    images[:, 4:24, 4:24] = 255  # one filled square per "digit"
    md = MovingDigits(images, np.arange(10), num_frames=40, size=32, digit_size=8, max_digits=2,
                      min_speed=2.0, max_speed=3.0)
    clips, digits = md.sample(64, torch.Generator().manual_seed(0))
    assert clips.shape == (64, 1, 40, 32, 32) and float(clips.min()) == -1.0 and float(clips.max()) == 1.0
    lit = (clips > 0).float().sum(dim=(-1, -2))[:, 0]  # [B, F] lit pixels per frame
    assert (lit > 0).all(), "a digit is visible in every frame (it bounces, never leaves)"
    single = digits[:, 1] < 0
    assert single.any() and (~single).any(), "clips have one or two digits"
    assert ((digits[:, 0] >= 0) & (digits[:, 0] < 10)).all()
    # one digit: its 6x6 lit core keeps its area in every frame (no clipping at the border)
    core = float(lit[single].min())
    assert core == float(lit[single].max())
    # positions change: over 40 frames at >= 2 px/frame a digit must hit a wall and come back
    frames = (clips[single][:, 0] > 0).float()
    centre_x = (frames.sum(-2) * torch.arange(32.)).sum(-1) / frames.sum(dim=(-1, -2))
    step = centre_x.diff(dim=-1)
    assert ((step > 0).any(-1) & (step < 0).any(-1)).any(), "horizontal motion reverses at a wall"


# ----------------------------------------------------------------------------------------------- pipelines


def test_mmdit_pipeline_shapes_determinism_and_batched_cfg(mmdit):
    tr = mmdit.transformer
    assert type(tr).__name__ == "SD3Transformer2DModel" and not tr.training
    assert get_adapter(tr).family == "sd3"
    calls = []
    handle = tr.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        def run(seed):
            return mmdit(["a photo of a cat", "a ship"], num_inference_steps=2, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(seed), output_type="pt").images
        a, b, c = run(0), run(0), run(1)
    finally:
        handle.remove()
    assert a.shape == (2, 3, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert calls == [4] * 6, "one [uncond, cond] transformer call per step"
    ims = mmdit("a photo of a dog", num_inference_steps=1, guidance_scale=1.0).images
    assert len(ims) == 1 and ims[0].size == (32, 32)
    with pytest.raises(ValueError):
        mmdit(["a", "b"], negative_prompt=["x"], num_inference_steps=1)


def test_mmdit_follows_the_prompt(mmdit):
    """Same noise, different class prompts -> clearly different images; same prompt -> identical."""
    def g():
        return torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=8, output_type="pt")
    plane = mmdit(["a photo of an airplane"] * 2, generator=g(), **kw).images
    frog = mmdit(["a photo of a frog"] * 2, generator=g(), **kw).images
    diff = (plane - frog).abs().mean()
    assert diff > 0.05, f"prompts barely change the image ({diff:.3f})"
    # airplanes are mostly sky (blue-ish), frogs green/brown: compare the blue-minus-green channel means
    assert float((plane[:, 2] - plane[:, 1]).mean()) > float((frog[:, 2] - frog[:, 1]).mean())


def test_wan_pipeline_shapes_and_separate_cfg_calls(wan):
    tr = wan.transformer
    assert type(tr).__name__ == "WanTransformer3DModel" and get_adapter(tr).family == "wan"
    conds = []
    handle = tr.register_forward_pre_hook(
        lambda m, a, kw: conds.append(kw["encoder_hidden_states"][:, 1].clone()), with_kwargs=True)
    try:
        out = wan(["the digit 3 bouncing"], num_frames=2, num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert out.frames.shape == (1, 2, 32, 32, 3) and out.frames.dtype == np.float32
    assert len(conds) == 4, "a conditional and an unconditional call per step"
    assert torch.equal(conds[0], conds[2]) and torch.equal(conds[1], conds[3])
    assert not torch.equal(conds[0], conds[1]), "cond first, then uncond (as WanPipeline)"
    pil = wan("the digit 1", num_frames=1, num_inference_steps=1, guidance_scale=1.0, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 1 and pil[0][0].size == (32, 32)
    with pytest.raises(ValueError):
        wan("the digit 1", height=31, num_inference_steps=1)


def test_components_round_trip_into_a_fresh_pipeline(mmdit, tmp_path):
    """build_components + the saved weights rebuild the same model (what the training script exports)."""
    from safetensors.torch import save_file

    meta = json.loads(zoo.weights_paths("cifar10_mmdit")[1].read_text())
    state = {f"transformer.{k}": v for k, v in mmdit.transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in mmdit.text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "cifar10_mmdit.safetensors"))
    (tmp_path / "cifar10_mmdit.json").write_text(json.dumps(meta))
    again = zoo.load("cifar10_mmdit", weights_dir=tmp_path)
    kw = dict(num_inference_steps=2, output_type="pt")
    assert torch.equal(again("a cat", generator=torch.Generator().manual_seed(0), **kw).images,
                       mmdit("a cat", generator=torch.Generator().manual_seed(0), **kw).images)
    (tmp_path / "cifar10_mmdit.safetensors").unlink()
    bad = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "cifar10_mmdit.safetensors"))
    with pytest.raises(RuntimeError, match="text_encoder"):
        zoo.load("cifar10_mmdit", weights_dir=tmp_path)


def test_vocabularies_are_fixed():
    """The tokenizer is rebuilt from code at load time: its vocabulary must not drift from the trained one."""
    for name in TEXT_MODELS:
        meta = json.loads(zoo.weights_paths(name)[1].read_text())
        assert list(configs.VOCABULARIES[meta["vocab"]]) == meta["vocab_words"]
        tok = text.build_tokenizer(meta["vocab"], meta["max_text_length"])
        assert len(tok) == len(meta["vocab_words"]) + len(text.SPECIAL_TOKENS)
    assert len(configs.CIFAR10_VOCAB) == len(set(configs.CIFAR10_VOCAB))


@pytest.mark.parametrize("name,frames", [("cifar10_mmdit", None), ("digits_wan", 8)])
def test_demo_runs_on_the_text_models(name, frames):
    from dit_accel.demo import load_demo_model

    model = load_demo_model(name, steps=1, batch=2)
    out = model.call()
    assert out.ndim == 4 and out.shape[1] == 3 and out.shape[-2:] == (32, 32)
    assert out.shape[0] == (frames or 2)


def test_subpackages_load_on_attribute_access():
    import dit_accel

    assert dit_accel.zoo.load is zoo.load
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dit_accel.nope  # noqa: B018


def test_unknown_prompt_words_are_named_once(mmdit, caplog):
    assert text.unknown_words(mmdit.tokenizer, ["A red sports-car!", "a photo of a cat"]) == ["red", "sports-car"]
    with caplog.at_level("WARNING", logger="dit_accel"):
        mmdit("a red cat", num_inference_steps=1)
        mmdit("a red cat", num_inference_steps=1)
    warnings = [r for r in caplog.records if "vocabulary" in r.getMessage()]
    assert len(warnings) == 1 and "'red'" in warnings[0].getMessage()
