"""Model adapters of the tier-1 families, checked against what the diffusers models actually do.

Block lists are compared with the blocks that really run (and in which order), the modulated input
with the tensor the first block's attention receives, and the token layout with the latent shapes,
the model config and the token count the blocks process. Unsupported models must be refused with a
helpful message, and the generic adapter (``blocks=`` / ``block_returns=``) must work on a custom model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import pytest
import torch
from torch import nn

import dit_accel
from dit_accel import PolicyError
from dit_accel.adapters import ADAPTERS, get_adapter, supported_classes
from dit_accel.testing import (CFG_LAYOUT, FAMILIES, family_names, get_family, tiny_call_kwargs, tiny_pipeline,
                               tiny_transformer)

from helpers import TRANSFORMER_CLASSES

# Block lists in execution order (double-stream blocks before single-stream ones).
BLOCK_GROUPS = {
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "sd3": ("transformer_blocks",),
    "pixart": ("transformer_blocks",),
    "dit": ("transformer_blocks",),
    "wan": ("blocks",),
    "hunyuan_video": ("transformer_blocks", "single_transformer_blocks"),
    "cogvideox": ("transformer_blocks",),
}
# Where text tokens sit in attention: concatenated before/after the visual tokens, cross-attention, or none.
TEXT_POSITION = {
    "flux": "joint_first",  # FluxAttnProcessor: cat([encoder, hidden])
    "sd3": "joint_last",  # JointAttnProcessor: cat([hidden, encoder])
    "pixart": "cross",
    "dit": "none",  # class-conditional
    "wan": "cross",
    "hunyuan_video": "joint_last",  # HunyuanVideoAttnProcessor: cat([hidden, encoder])
    "cogvideox": "joint_first",  # CogVideoXAttnProcessor: cat([encoder, hidden])
}
# Axes of the latent tensor the transformer receives ("packed": Flux's [B, tokens, C*4]).
LATENT_AXES = {
    "flux": "packed",
    "sd3": "BCHW",
    "pixart": "BCHW",
    "dit": "BCHW",
    "wan": "BCFHW",
    "hunyuan_video": "BCFHW",
    "cogvideox": "BFCHW",
}

parametrize_families = pytest.mark.parametrize("family", FAMILIES)


@functools.lru_cache(maxsize=None)
def cached_pipeline(family: str):
    """One shared pipeline per family: every test here removes the hooks it adds."""
    return tiny_pipeline(family)


def run_pipeline(family: str):
    pipe = cached_pipeline(family)
    with torch.no_grad():
        return pipe(**tiny_call_kwargs(family))


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of a recorded ``module(*args, **kwargs)`` call, by parameter name."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments


@contextlib.contextmanager
def torch_pre_hooks(*pairs):
    """Register ``(module, hook)`` forward pre-hooks (with kwargs) for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def record_first_call(record: dict, key: str):
    """A pre-hook storing the (args, kwargs) of the first call under ``record[key]``."""
    def hook(module, args, kwargs):
        record.setdefault(key, (args, dict(kwargs)))
    return hook


def hook_snapshot(root: nn.Module) -> dict:
    snap = {}
    for name, module in root.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        snap[name] = (len(module._forward_pre_hooks), len(module._forward_hooks),
                      None if registry is None else tuple(registry.hooks), "forward" in module.__dict__,
                      hasattr(module, "_dit_accel"))
    return snap


def expected_grid(family: str, transformer: nn.Module, latents: torch.Tensor, pipe) -> tuple[int, int, int]:
    """(frames, height, width) in tokens, from the latent shape and the model config (not the adapter)."""
    cfg = transformer.config
    if LATENT_AXES[family] == "packed":  # Flux packs 2x2 latent pixels into one token
        vae_scale = pipe.vae_scale_factor
        kw = tiny_call_kwargs(family)
        latent_h, latent_w = 2 * (kw["height"] // (vae_scale * 2)), 2 * (kw["width"] // (vae_scale * 2))
        assert cfg.patch_size == 1
        return 1, latent_h // 2, latent_w // 2
    axes = LATENT_AXES[family]
    size = dict(zip(axes, latents.shape))
    patch = cfg.patch_size
    if isinstance(patch, (tuple, list)):
        pt, ph, pw = patch
    else:
        pt, ph, pw = (cfg.get("patch_size_t") or 1), patch, patch
    frames = size["F"] // pt if "F" in size else 1
    return frames, size["H"] // ph, size["W"] // pw


# --- a small custom transformer for the generic adapter ------------------------------------------


class ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.norm(hidden_states))


class TinyCustomTransformer(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList([ResidualMLPBlock(dim) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.proj_in(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.proj_out(hidden_states)


def tiny_custom(seed: int = 0) -> tuple[TinyCustomTransformer, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCustomTransformer().eval()
        x = torch.randn(2, 5, 8)
    return model, x


# ---------------------------------------------------------------------------------------------------
# Registry and block lists
# ---------------------------------------------------------------------------------------------------


def test_supported_classes_cover_tier1():
    classes = supported_classes()
    assert set(TRANSFORMER_CLASSES.values()) <= set(classes)
    assert classes == sorted(classes)


@parametrize_families
def test_get_adapter_returns_family_adapter(family):
    tr = tiny_transformer(family)
    adapter = get_adapter(tr)
    assert type(tr).__name__ == TRANSFORMER_CLASSES[family]
    assert adapter.family == family
    assert TRANSFORMER_CLASSES[family] in adapter.model_classes
    assert adapter is ADAPTERS[TRANSFORMER_CLASSES[family]]
    assert adapter.text_position == TEXT_POSITION[family]


@parametrize_families
def test_blocks_in_execution_order(family):
    pipe = cached_pipeline(family)
    tr = pipe.transformer
    adapter = get_adapter(tr)
    blocks = adapter.blocks(tr)

    groups = BLOCK_GROUPS[family]
    # the table above names every top-level block list of the model
    assert {n for n, c in tr.named_children() if isinstance(c, nn.ModuleList) and "blocks" in n} == set(groups)
    expected = [(f"{g}.{i}", block) for g in groups for i, block in enumerate(getattr(tr, g))]
    assert len(blocks) == sum(len(getattr(tr, g)) for g in groups) == len(expected) >= 4
    assert [b.name for b in blocks] == [name for name, _ in expected]
    assert all(b.module is module for b, (_, module) in zip(blocks, expected))
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert all(b.meta is not None for b in blocks)
    if len(groups) == 2:  # double-stream blocks before single-stream ones
        assert blocks[0].name.startswith("transformer_blocks.")
        assert blocks[-1].name.startswith("single_transformer_blocks.")

    # the order blocks actually run in, during the first transformer call of a pipeline call
    order: list[int] = []
    state = {"calls": 0}

    def count_call(module, args, kwargs):
        state["calls"] += 1

    def block_hook(index):
        def hook(module, args, kwargs):
            if state["calls"] == 1:
                order.append(index)
        return hook

    with torch_pre_hooks((tr, count_call), *[(b.module, block_hook(b.index)) for b in blocks]):
        run_pipeline(family)
    assert state["calls"] >= 1
    assert order == list(range(len(blocks)))


# ---------------------------------------------------------------------------------------------------
# Modulated input: what the first block's attention really receives
# ---------------------------------------------------------------------------------------------------


@parametrize_families
def test_modulated_input_equals_attention_input(family):
    pipe = cached_pipeline(family)
    tr = pipe.transformer
    adapter = get_adapter(tr)
    first = adapter.blocks(tr)[0]
    attention = getattr(first.module, adapter.attention_module)
    assert isinstance(attention, nn.Module)
    record: dict = {}

    def block_pre(module, args, kwargs):
        if "modulated" not in record:
            record["block_call"] = (args, dict(kwargs))
            record["modulated"] = adapter.modulated_input(first, args, kwargs)

    def attention_pre(module, args, kwargs):
        if "modulated" in record and "attention_input" not in record:  # first attention call of that block call
            record["attention_input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    with torch_pre_hooks((first.module, block_pre), (attention, attention_pre)):
        run_pipeline(family)

    modulated, seen = record["modulated"], record["attention_input"]
    assert isinstance(modulated, torch.Tensor)
    assert modulated.shape == seen.shape
    assert modulated.dtype == seen.dtype
    assert torch.allclose(modulated, seen, rtol=0, atol=1e-6), (modulated - seen).abs().max()

    # the check discriminates: the block's raw input is not what attention sees
    raw = call_arguments(first.module, *record["block_call"])["hidden_states"]
    assert raw.shape == seen.shape
    assert not torch.allclose(raw, seen, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# Token layout
# ---------------------------------------------------------------------------------------------------


@parametrize_families
def test_token_layout(family):
    pipe = cached_pipeline(family)
    tr = pipe.transformer
    adapter = get_adapter(tr)
    first = adapter.blocks(tr)[0]
    record: dict = {}
    with torch_pre_hooks((tr, record_first_call(record, "transformer")),
                         (first.module, record_first_call(record, "block"))):
        run_pipeline(family)

    args, kwargs = record["transformer"]
    layout = adapter.token_layout(tr, args, kwargs)
    bound = call_arguments(tr, args, kwargs)
    latents = bound["hidden_states"]
    encoder = bound.get("encoder_hidden_states")

    # text tokens
    if family == "dit":
        assert encoder is None
        assert layout.text_tokens == 0
    else:
        assert encoder is not None
        assert layout.text_tokens == encoder.shape[1] > 0
    assert layout.text_position == TEXT_POSITION[family] == adapter.text_position

    # visual token grid, from the latents and the config
    grid = expected_grid(family, tr, latents, pipe)
    assert tuple(layout.grid) == grid
    assert layout.visual_tokens == grid[0] * grid[1] * grid[2]
    if family == "flux":
        assert layout.visual_tokens == latents.shape[1]  # packed sequence length
    if LATENT_AXES[family].count("F"):
        assert layout.grid[0] >= 2  # the tiny video calls have at least two latent frames

    # ... and the number of visual tokens the blocks actually process
    block_hidden = call_arguments(first.module, *record["block"])["hidden_states"]
    assert block_hidden.shape[1] == layout.visual_tokens


@parametrize_families
def test_cfg_layout_matches_testing(family):
    adapter = get_adapter(tiny_transformer(family))
    if family == "flux":
        # the adapter describes true CFG (true_cfg_scale > 1: separate cond/uncond calls); the tiny default
        # call is guidance-distilled (guidance as an embedding input, one call per step)
        assert adapter.cfg_layout == "separate"
        assert CFG_LAYOUT[family] == "none"
    else:
        assert adapter.cfg_layout == CFG_LAYOUT[family]


# ---------------------------------------------------------------------------------------------------
# Unsupported models and the generic adapter
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.Linear(2, 2), lambda: tiny_custom()[0]], ids=["linear", "custom"])
def test_unsupported_model_is_refused_with_help(make):
    model = make()
    before = hook_snapshot(model)
    with pytest.raises(PolicyError) as info:
        dit_accel.accelerate(model, "fbcache")
    msg = str(info.value)
    assert type(model).__name__ in msg
    for name in TRANSFORMER_CLASSES.values():
        assert name in msg
    assert "blocks=" in msg and "block_returns" in msg
    assert not dit_accel.is_accelerated(model)
    assert hook_snapshot(model) == before
    with pytest.raises(PolicyError):
        get_adapter(model)


def test_generic_adapter_fora():
    model, x = tiny_custom()
    before = hook_snapshot(model)
    with torch.no_grad():
        reference = model(x)
        dit_accel.accelerate(model, {"cache": {"method": "fora", "interval": 2}}, blocks=["layers"],
                             block_returns=("hidden",))
        try:
            assert dit_accel.is_accelerated(model)
            outputs = [model(x) for _ in range(4)]
            stats = dit_accel.stats(model)
        finally:
            dit_accel.remove(model)
        restored = model(x)

    assert stats.family == "generic"
    assert stats.block_names == [f"layers.{i}" for i in range(4)]
    assert stats.transformer_calls == 4
    assert stats.blocks_reused > 0
    # interval 2: steps 0 and 2 compute every block, steps 1 and 3 reuse every block
    assert stats.reused == [2, 2, 2, 2]
    assert stats.computed == [2, 2, 2, 2]
    assert torch.equal(outputs[0], reference)
    assert torch.equal(outputs[2], reference)
    for reused in (outputs[1], outputs[3]):  # same input: the cached residuals rebuild the output
        assert torch.allclose(reused, reference, rtol=0, atol=1e-5)

    assert not dit_accel.is_accelerated(model)
    assert torch.equal(restored, reference)
    assert hook_snapshot(model) == before


BAD_GENERIC = {
    "blocks-str": (dict(blocks="layers", block_returns=("hidden",)), ["blocks", "'layers'", "list"]),
    "blocks-empty": (dict(blocks=[], block_returns=("hidden",)), ["blocks"]),
    "blocks-missing": (dict(blocks=["nope"], block_returns=("hidden",)), ["'nope'", "ModuleList"]),
    "blocks-not-a-list": (dict(blocks=["proj_in"], block_returns=("hidden",)), ["'proj_in'", "ModuleList"]),
    "returns-no-hidden": (dict(blocks=["layers"], block_returns=("encoder",)), ["block_returns", "'hidden'"]),
    "returns-unknown": (dict(blocks=["layers"], block_returns=("hidden", "attn")), ["block_returns", "'attn'"]),
    "returns-missing": (dict(blocks=["layers"]), ["block_returns", "ResidualMLPBlock"]),
}


@pytest.mark.parametrize("kwargs,fragments", list(BAD_GENERIC.values()), ids=list(BAD_GENERIC))
def test_bad_generic_arguments(kwargs, fragments):
    model, x = tiny_custom()
    before = hook_snapshot(model)
    with pytest.raises(PolicyError) as info:
        dit_accel.accelerate(model, {"cache": {"method": "fora", "interval": 2}}, **kwargs)
    msg = str(info.value)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"
    assert not dit_accel.is_accelerated(model)
    assert hook_snapshot(model) == before


def test_duplicate_block_lists_are_refused():
    model, _ = tiny_custom()
    before = hook_snapshot(model)
    try:
        with pytest.raises(PolicyError, match="layers"):
            dit_accel.accelerate(model, {"cache": {"method": "fora"}}, blocks=["layers", "layers"],
                                 block_returns=("hidden",))
    finally:
        assert not dit_accel.is_accelerated(model)
        assert hook_snapshot(model) == before


# ---------------------------------------------------------------------------------------------------
# Coverage families (tier 2): the same checks, against what their tiny pipelines really run
# ---------------------------------------------------------------------------------------------------

COVERAGE = family_names(tier=2)


@functools.lru_cache(maxsize=None)
def observed_call(family: str) -> dict:
    """One tiny call of ``family`` watched: the order blocks run in (first transformer call), the first
    transformer call's and first block call's arguments, what the first block's attention receives, the
    modulated input the adapter computes, and the query length of that attention's SDPA call."""
    pipe = cached_pipeline(family)
    tr = pipe.transformer
    adapter = get_adapter(tr)
    blocks = adapter.blocks(tr)
    first = blocks[0]
    attention = getattr(first.module, adapter.attention_module)
    record: dict = {"order": [], "calls": 0}

    def on_call(module, args, kwargs):
        record["calls"] += 1
        record.setdefault("transformer", (args, dict(kwargs)))

    def on_block(index):
        def hook(module, args, kwargs):
            if record["calls"] == 1:
                record["order"].append(index)
            if index == 0 and "modulated" not in record:
                record["block"] = (args, dict(kwargs))
                record["modulated"] = adapter.modulated_input(first, args, kwargs)
        return hook

    def on_attention(module, args, kwargs):
        if "attention_input" not in record:
            record["attention_input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    class SDPALength(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention and "sdpa" not in record:
                record["sdpa"] = (args[0] if args else kwargs["query"]).shape[-2]
            return func(*args, **(kwargs or {}))

    def attention_call(module, args, kwargs):
        if "sdpa_mode" not in record:
            record["sdpa_mode"] = SDPALength()
            record["sdpa_mode"].__enter__()

    def attention_done(module, args, output):
        mode = record.get("sdpa_mode")
        if mode is not None and not record.get("sdpa_done"):
            record["sdpa_done"] = True
            mode.__exit__(None, None, None)

    handles = [attention.register_forward_hook(attention_done)]
    try:
        with torch_pre_hooks((tr, on_call), *[(b.module, on_block(b.index)) for b in blocks], (attention, on_attention),
                             (attention, attention_call)):
            run_pipeline(family)
    finally:
        for handle in handles:
            handle.remove()
    return record


@pytest.mark.parametrize("family", COVERAGE)
def test_coverage_adapter_matches_the_model(family):
    record = get_family(family)
    pipe = cached_pipeline(family)
    tr = pipe.transformer
    adapter = get_adapter(tr)
    assert type(tr).__name__ == record.transformer_class and adapter is ADAPTERS[record.transformer_class]
    assert adapter.text_position in ("joint_first", "joint_last", "cross")
    blocks = adapter.blocks(tr)
    seen = observed_call(family)
    assert len(blocks) >= 4 and seen["order"] == list(range(len(blocks)))  # every block, in execution order

    # the modulated input is what the first block's attention receives, and not the raw block input
    modulated, attention_input = seen["modulated"], seen["attention_input"]
    assert modulated.shape == attention_input.shape and modulated.dtype == attention_input.dtype
    assert torch.allclose(modulated, attention_input, rtol=0, atol=1e-6)
    raw = call_arguments(blocks[0].module, *seen["block"])[blocks[0].meta.hidden_states_argument_name]
    assert raw.shape != attention_input.shape or not torch.allclose(raw, attention_input, atol=1e-3)

    # token layout: the visual grid covers the tokens the blocks process, the text tokens the rest of a joint
    # sequence; the first attention's SDPA runs over exactly these tokens
    layout = adapter.token_layout(tr, *seen["transformer"])
    hidden = call_arguments(blocks[0].module, *seen["block"])[blocks[0].meta.hidden_states_argument_name]
    joint = adapter.text_position != "cross"
    stream = hidden.shape[1] if hidden.dim() == 3 else None
    if adapter.sparse_unsupported is None:
        assert seen["sdpa"] == layout.visual_tokens + (layout.text_tokens if joint else 0), (seen["sdpa"], layout)
    if stream is not None:
        assert stream in (layout.visual_tokens, layout.visual_tokens + layout.text_tokens)
    assert layout.visual_tokens >= 4 and layout.text_tokens > 0


@pytest.mark.parametrize("family", COVERAGE)
def test_coverage_cfg_layout_matches_the_pipeline(family):
    """The record's CFG layout is what the tiny call runs: calls per step and batch per call."""
    record = get_family(family)
    seen = observed_call(family)
    batch = call_arguments(cached_pipeline(family).transformer, *seen["transformer"])["hidden_states"]
    batch = batch[0].shape[0] if isinstance(batch, list) else batch.shape[0]
    per_step = seen["calls"] // tiny_call_kwargs(family)["num_inference_steps"]
    assert (per_step, batch) == {"separate": (2, 1), "batched": (1, 2), "none": (1, 1)}[record.cfg_layout]
    adapter = get_adapter(cached_pipeline(family).transformer)
    assert adapter.cfg_layout == record.cfg_layout or record.cfg_layout == "none"  # none: a call without CFG
