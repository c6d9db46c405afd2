"""Linear-layer quantization through torchao: what is quantized, that it changes outputs a little,
that removal restores the original weights bit-exactly, and the policy section."""

import pytest
import torch

import dit_accel
import dit_accel.quant
from dit_accel.config import PolicyError
from dit_accel.quant import LinearQuantConfig, candidate_linears, quantize_linears, torchao_available
from dit_accel.testing import tiny_generate, tiny_pipeline, tiny_transformer

pytestmark = pytest.mark.skipif(not torchao_available(), reason="torchao not installed (extra 'quant')")


def _block_linears(transformer):
    from dit_accel.adapters import get_adapter

    blocks = get_adapter(transformer).blocks(transformer)
    return candidate_linears(transformer, [(b.name, b.module) for b in blocks])


def _weights(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_int8_weight_only_quantizes_block_linears_only():
    tr = tiny_transformer("flux")
    before = {n: type(m.weight) for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    chosen, _ = _block_linears(tr)
    handle = quantize_linears(tr, "int8_weight_only")
    assert handle.quantized, "no linear layer was quantized"
    assert set(handle.quantized) == set(chosen)
    for name, mod in tr.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        quantized = type(mod.weight.data) is not torch.Tensor
        assert quantized == (name in handle.quantized), name
        if not name.startswith(("transformer_blocks", "single_transformer_blocks")):
            assert not quantized, f"{name} lies outside the blocks (embedder / final projection)"
    assert "proj_out" in before and "x_embedder" in before  # really present, and left alone above
    handle.restore()
    assert all(type(m.weight) is torch.nn.Parameter and type(m.weight.data) is torch.Tensor
               for m in tr.modules() if isinstance(m, torch.nn.Linear))


def test_skip_patterns_respected():
    tr = tiny_transformer("flux")
    handle = quantize_linears(tr, "int8_weight_only", skip=["*.attn.to_q", "single_transformer_blocks.*"])
    assert handle.quantized
    assert not any(n.endswith(".attn.to_q") or n.startswith("single_transformer_blocks") for n in handle.quantized)
    assert any(n.endswith(".attn.to_q") for n in handle.skipped)
    assert type(tr.transformer_blocks[0].attn.to_q.weight.data) is torch.Tensor
    assert type(tr.transformer_blocks[0].attn.to_k.weight.data) is not torch.Tensor
    handle.restore()


def test_accelerate_quantizes_changes_output_slightly_and_remove_restores_bit_exact():
    pipe = tiny_pipeline("dit")
    base = tiny_generate(pipe, "dit")
    weights = _weights(pipe.transformer)
    policy = {"name": "int8-linears", "cache": None, "quant": {"linear": "int8_weight_only"}}
    dit_accel.accelerate(pipe, policy)
    assert any(type(m.weight.data) is not torch.Tensor for m in pipe.transformer.modules()
               if isinstance(m, torch.nn.Linear))
    quant = tiny_generate(pipe, "dit")
    diff = (quant - base).abs().max().item()
    assert 0 < diff < 0.05 * base.abs().max().item(), diff
    dit_accel.remove(pipe)
    after = _weights(pipe.transformer)
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[n], weights[n]) and after[n].dtype == weights[n].dtype for n in weights)
    assert not any("extra_repr" in m.__dict__ for m in pipe.transformer.modules())
    assert torch.equal(tiny_generate(pipe, "dit"), base)


def test_keep_originals_on_device_restores_the_same_parameters():
    tr = tiny_transformer("dit")
    params = {n: m.weight for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    handle = quantize_linears(tr, "int8_weight_only", keep_originals="device")
    handle.restore()
    assert all(dict(tr.named_modules())[n].weight is p for n, p in params.items())


def test_bad_mode_and_options_give_clear_errors():
    tr = tiny_transformer("dit")
    with pytest.raises(PolicyError, match="int4.*choose one of.*fp8_dynamic"):
        quantize_linears(tr, "int4")
    with pytest.raises(PolicyError, match="quant.linear.*choose one of"):
        dit_accel.load_policy({"quant": {"linear": "int4"}})
    with pytest.raises(PolicyError, match="quant.skip"):
        LinearQuantConfig(skip="proj_out")
    with pytest.raises(PolicyError, match="unknown key 'linaer'"):
        dit_accel.load_policy({"quant": {"linaer": "fp8_dynamic"}})
    if not torch.cuda.is_available():
        with pytest.raises(PolicyError, match="compute capability"):
            quantize_linears(tr, "fp8_dynamic")
        pipe = tiny_pipeline("dit")
        with pytest.raises(PolicyError, match="compute capability"):
            dit_accel.accelerate(pipe, {"quant": {"linear": "fp8_dynamic"}})
        assert not dit_accel.is_accelerated(pipe)  # nothing stays attached
        assert all(type(m.weight.data) is torch.Tensor for m in pipe.transformer.modules()
                   if isinstance(m, torch.nn.Linear))


def test_policy_quant_section_round_trips():
    data = {"name": "q", "cache": {"method": "fora"},
            "quant": {"linear": "int8_dynamic", "skip": ["*.ff.*"], "granularity": "row", "keep_originals": "cpu"}}
    policy = dit_accel.load_policy(data)
    assert isinstance(policy.quant, LinearQuantConfig) and policy.quant.skip == ("*.ff.*",)
    again = dit_accel.Policy.from_dict(policy.to_dict())
    assert again == policy
    import yaml

    assert dit_accel.Policy.from_dict(yaml.safe_load(policy.to_yaml())) == policy
    assert "quant" not in dit_accel.load_policy({"cache": {"method": "fora"}}).to_dict()


def test_quantized_context_restores_after_the_block():
    pipe = tiny_pipeline("dit")
    weights = _weights(pipe.transformer)
    with dit_accel.quant.quantized(pipe, LinearQuantConfig(linear="int8_weight_only")):
        assert any(type(m.weight.data) is not torch.Tensor for m in pipe.transformer.modules()
                   if isinstance(m, torch.nn.Linear))
    after = _weights(pipe.transformer)
    assert all(torch.equal(after[n], weights[n]) for n in weights)
    with dit_accel.quant.quantized(pipe, None):
        assert all(type(m.weight.data) is torch.Tensor for m in pipe.transformer.modules()
                   if isinstance(m, torch.nn.Linear))


def test_calibrate_measures_the_gate_on_the_quantized_model_and_keeps_sections():
    """CacheQuant: cache and quantization errors compound, so the gate is calibrated with quant on."""
    pipe = tiny_pipeline("dit")
    kwargs = dict(num_inference_steps=6)
    prompts = lambda: [{"class_labels": [1, 7], "generator": torch.Generator().manual_seed(0)}]  # noqa: E731
    plain = dit_accel.calibrate(pipe, prompts(), {"name": "m", "cache": {"method": "magcache"}}, **kwargs)
    spec = {"name": "mq", "cache": {"method": "magcache"}, "quant": {"linear": "int8_weight_only"},
            "guidance": {"method": "adaptive", "threshold": 0.99}}
    quant = dit_accel.calibrate(pipe, prompts(), spec, **kwargs)
    assert quant.quant == dit_accel.load_policy(spec).quant and quant.guidance is not None
    assert quant.cache.mag_ratios != plain.cache.mag_ratios, "ratios must come from the quantized model"
    weights = _weights(pipe.transformer)
    again = dit_accel.calibrate(pipe, prompts(), spec, **kwargs)
    assert dit_accel.calibrate(pipe, prompts(), "magcache", **kwargs).cache.mag_ratios == plain.cache.mag_ratios
    assert again.cache.mag_ratios == quant.cache.mag_ratios
    assert all(torch.equal(p, weights[n]) for n, p in _weights(pipe.transformer).items()), "weights restored"


def test_attention_section_leaves_its_projections_quantized_and_skip_keeps_them_in_bf16():
    # the routed attention is one custom op inside the compiled block: its projections fuse like the rest
    # (quantizing them was faster on Wan, compose_wan_h200_levers.md); quant.skip keeps them in bf16
    pipe = tiny_pipeline("flux")
    attention = {"sparse": {"method": "topp", "density": 0.5}, "block_size": 16}
    for skip in ([], ["transformer_blocks.*.attn.*"]):
        dit_accel.accelerate(pipe, {"name": "sparse-int8", "attention": attention,
                                    "quant": {"linear": "int8_dynamic", "skip": skip}})
        try:
            handle = pipe.transformer.__dict__[dit_accel.quant._ATTR]
            routed = [n for n in (*handle.quantized, *handle.skipped) if n.startswith("transformer_blocks.")
                      and ".attn." in n]
            assert routed, "the tiny FLUX blocks have attention projections"
            assert (set(routed) <= set(handle.skipped)) if skip else (set(routed) <= set(handle.quantized))
            assert any(".ff." in n for n in handle.quantized)
            tiny_generate(pipe, "flux")
            assert dit_accel.stats(pipe).extra["attention"]["calls"]["sparse"] > 0
        finally:
            dit_accel.remove(pipe)


def test_without_attention_section_every_block_linear_is_quantized():
    pipe = tiny_pipeline("flux")
    dit_accel.accelerate(pipe, {"name": "int8", "quant": {"linear": "int8_dynamic"}})
    try:
        handle = pipe.transformer.__dict__[dit_accel.quant._ATTR]
        assert any(".attn." in n for n in handle.quantized)
    finally:
        dit_accel.remove(pipe)
