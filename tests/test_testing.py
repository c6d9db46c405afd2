"""Tests for dit_accel.testing: tiny offline pipelines of every tier-1 family (CPU, fast)."""

from __future__ import annotations

import functools
import socket

import pytest
import torch

from dit_accel.testing import CFG_LAYOUT, FAMILIES, get_family, tiny_call_kwargs, tiny_pipeline, tiny_transformer

from helpers import TRANSFORMER_CLASSES

# Declared by each family's record (dit_accel/testing/families.py), checked here against what is built.
PIPELINE_CLASSES = {family: get_family(family).pipeline_class for family in FAMILIES}
# Output of one default call (batch 1): latents, except DiT which always decodes to an image.
EXPECTED_SHAPES = {family: get_family(family).output_shape for family in FAMILIES}
STEPS = 4

parametrize_families = pytest.mark.parametrize("family", FAMILIES)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run the tiny models on one intra-op thread: on small shared CPUs, OpenMP barriers between
    threads can make millisecond-sized ops take 50x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def cached_pipeline(family: str):
    """One shared pipeline per family for tests that leave it unchanged (hooks are always removed)."""
    return tiny_pipeline(family)


def run(pipe, family: str, seed: int = 0, **overrides) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(family, seed, **overrides))[0]


def blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """All transformer blocks in execution order (double-stream blocks first)."""
    names = ("transformer_blocks", "blocks", "single_transformer_blocks")
    return [block for name in names for block in getattr(transformer, name, [])]


class TransformerCalls:
    """Records the batch size of every transformer forward while active."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.batches: list[int] = []

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.batches.append(hidden.shape[0])

    def __enter__(self) -> "TransformerCalls":
        self.handle = self.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _perturb(output):
    if isinstance(output, torch.Tensor):
        return output + 1.0
    if isinstance(output, tuple):
        return tuple(_perturb(item) for item in output)
    return output


@parametrize_families
def test_pipeline_builds_offline(family, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tiny pipelines must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    pipe = tiny_pipeline(family)

    assert type(pipe).__name__ == PIPELINE_CLASSES[family]
    assert type(pipe.transformer).__name__ == TRANSFORMER_CLASSES[family]
    assert pipe._progress_bar_config == {"disable": True}
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert len(modules) >= 2
    for module in modules:
        assert not module.training
        for param in module.parameters():
            assert param.device.type == "cpu"
            assert param.dtype == torch.float32


@parametrize_families
def test_call_runs_with_finite_output_of_expected_shape(family):
    out = run(cached_pipeline(family), family)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == EXPECTED_SHAPES[family]
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


@parametrize_families
def test_same_seed_is_bit_identical_across_builds(family):
    first = run(tiny_pipeline(family, seed=0), family, seed=0)
    second = run(tiny_pipeline(family, seed=0), family, seed=0)
    assert torch.equal(first, second)


@parametrize_families
def test_different_seed_gives_different_output(family):
    pipe = cached_pipeline(family)
    assert not torch.equal(run(pipe, family, seed=0), run(pipe, family, seed=1))


@parametrize_families
def test_weight_seed_matters_and_is_reproducible(family):
    a, b, c = (tiny_transformer(family, seed).state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@parametrize_families
def test_global_rng_state_is_untouched(family):
    state = torch.get_rng_state()
    tiny_pipeline(family, seed=3)
    assert torch.equal(state, torch.get_rng_state())


@parametrize_families
def test_transformer_block_counts(family):
    model = tiny_transformer(family)
    assert type(model).__name__ == TRANSFORMER_CLASSES[family]
    assert not model.training
    assert len(blocks(model)) >= 4
    if family in ("flux", "hunyuan_video"):
        assert len(model.transformer_blocks) >= 2
        assert len(model.single_transformer_blocks) >= 2


@parametrize_families
def test_output_depends_on_every_block(family):
    pipe = cached_pipeline(family)
    reference = run(pipe, family)
    for index, block in enumerate(blocks(pipe.transformer)):
        handle = block.register_forward_hook(lambda module, args, output: _perturb(output))
        try:
            perturbed = run(pipe, family)
        finally:
            handle.remove()
        assert not torch.equal(reference, perturbed), f"output ignores block {index}"
    assert torch.equal(reference, run(pipe, family))


@parametrize_families
def test_conditioning_changes_output(family):
    pipe = cached_pipeline(family)
    other = {"class_labels": [2]} if get_family(family).class_labels else {"prompt": "a red car"}
    assert not torch.equal(run(pipe, family), run(pipe, family, **other))


@parametrize_families
def test_cfg_layout(family):
    pipe = cached_pipeline(family)
    with TransformerCalls(pipe.transformer) as calls:
        run(pipe, family)
    expected = {"batched": [2] * STEPS, "separate": [1] * (2 * STEPS), "none": [1] * STEPS}
    assert calls.batches == expected[CFG_LAYOUT[family]]


def test_cfg_layout_covers_all_families():
    assert set(CFG_LAYOUT) == set(FAMILIES)
    assert set(CFG_LAYOUT.values()) <= {"batched", "separate", "none"}


def test_flux_true_cfg_override_runs_separate_passes():
    pipe = cached_pipeline("flux")
    with TransformerCalls(pipe.transformer) as calls:
        out = run(pipe, "flux", true_cfg_scale=2.0, negative_prompt="x")
    assert calls.batches == [1] * (2 * STEPS)
    assert torch.isfinite(out).all()


@parametrize_families
def test_batched_prompts_override(family):
    overrides = {"class_labels": [1, 2]} if get_family(family).class_labels else {"prompt": ["a", "b"]}
    out = run(cached_pipeline(family), family, **overrides)
    assert tuple(out.shape) == (2, *EXPECTED_SHAPES[family][1:])
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])


def test_call_kwargs_defaults():
    for family in FAMILIES:
        kwargs = tiny_call_kwargs(family, seed=5)
        assert kwargs["num_inference_steps"] == STEPS
        assert isinstance(kwargs["generator"], torch.Generator)
        assert kwargs["generator"].initial_seed() == 5
        assert kwargs["output_type"] == ("pt" if family == "dit" else "latent")
        assert ("class_labels" if get_family(family).class_labels else "prompt") in kwargs
    assert tiny_call_kwargs("sd3", num_inference_steps=2)["num_inference_steps"] == 2


@pytest.mark.parametrize(
    "build", [tiny_transformer, tiny_pipeline, tiny_call_kwargs], ids=lambda f: f.__name__
)
def test_unknown_family_raises(build):
    with pytest.raises(ValueError, match="supported families") as info:
        build("not-a-family")
    for family in FAMILIES:
        assert family in str(info.value)


# ---------------------------------------------------------------------------------------------------
# The family records (dit_accel/testing/registry.py, families.py)
# ---------------------------------------------------------------------------------------------------


@parametrize_families
def test_declared_call_changes_do_what_they_say(family):
    """The call changes a record declares (the conformance suite varies calls with them) run and change
    what they name: the batch and per-prompt changes give 2 outputs, the resolution change another size."""
    record = get_family(family)
    pipe = cached_pipeline(family)
    changes = record.changes()
    assert list(changes)[:1] == ["steps"] and set(changes) <= {"steps", "resolution", "batch", "per_prompt"}
    assert ("resolution" in changes) == (record.resolution is not None)
    for name, overrides in changes.items():
        out = run(pipe, family, **overrides)
        assert torch.isfinite(out).all(), name
        if name in ("batch", "per_prompt"):
            assert out.shape[0] == 2, (name, tuple(out.shape))
        elif name == "resolution":
            assert out.shape[0] == 1 and tuple(out.shape) != EXPECTED_SHAPES[family]


@parametrize_families
def test_declared_attention_size_gives_several_16_token_blocks(family):
    from dit_accel.adapters import get_adapter

    record = get_family(family)
    pipe = cached_pipeline(family)
    adapter = get_adapter(pipe.transformer)
    grids = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: grids.append(adapter.token_layout(module, args, kwargs).grid), with_kwargs=True)
    try:
        run(pipe, family, **record.attention_size)
    finally:
        handle.remove()
    frames, height, width = grids[0]
    if record.attention_size:
        assert frames * height * width >= 3 * 16, grids[0]
    else:  # a fixed token grid (DiT): one 16-token block
        assert frames * height * width == 16


def test_registry_lists_every_family_once_and_in_order():
    import dit_accel.testing as testing

    assert FAMILIES == testing.family_names() == tuple(CFG_LAYOUT)
    assert len(set(FAMILIES)) == len(FAMILIES)
    for family in FAMILIES:
        record = get_family(family)
        assert record.name == family and CFG_LAYOUT[family] == record.cfg_layout
        assert record.calibration_prompts and all(
            isinstance(p, dict) if record.class_labels else isinstance(p, str) for p in record.calibration_prompts)


def test_register_family_adds_a_family_everywhere():
    import dataclasses

    import dit_accel.testing as testing
    from dit_accel.testing import registry

    clone = dataclasses.replace(get_family("dit"), name="dit_clone")
    with pytest.raises(ValueError, match="already registered"):
        testing.register_family(get_family("dit"))
    testing.register_family(clone)
    try:
        assert testing.FAMILIES[-1] == "dit_clone" and CFG_LAYOUT["dit_clone"] == "batched"
        out = run(tiny_pipeline("dit_clone"), "dit_clone")
        assert torch.equal(out, run(cached_pipeline("dit"), "dit"))
    finally:
        del registry._REGISTRY["dit_clone"], CFG_LAYOUT["dit_clone"]
    assert "dit_clone" not in testing.FAMILIES
    with pytest.raises(ValueError, match="cfg_layout"):
        dataclasses.replace(clone, cfg_layout="interleaved")


def test_importing_testing_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, dit_accel.testing as t; assert t.FAMILIES; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
