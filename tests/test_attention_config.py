"""The policy's attention section: validation, YAML round trip, composition with a cache section."""

import pytest
import yaml

import dit_accel
from dit_accel.attention import AttentionConfig
from dit_accel.config import PolicyError
from dit_accel.policy import Policy, load_policy
from dit_accel.testing import tiny_pipeline


def test_defaults_and_yaml_round_trip_with_cache(tmp_path):
    policy = Policy.from_dict({
        "name": "both",
        "cache": {"method": "fora", "interval": 2},
        "attention": {"sparse": {"method": "topp", "top_p": 0.8, "density": 0.25}, "reorder": "svg2",
                      "block_size": 32, "dense_layers": [3, 0, 3], "compensate": True,
                      "svg2": {"q_clusters": 10, "k_clusters": 20}},
    })
    att = policy.attention
    assert att.sparse.method == "topp" and att.sparse.density == 0.25 and att.dense_layers == (0, 3)
    assert att.svg2.k_clusters == 20 and att.svg2.iterations == 2  # unspecified fields keep their defaults
    path = tmp_path / "p.yaml"
    policy.save(path)
    again = load_policy(str(path))
    assert again == policy
    assert again.to_dict() == policy.to_dict()
    assert yaml.safe_load(policy.to_yaml())["attention"]["dense_layers"] == [0, 3]
    assert Policy.from_dict({"attention": {}}).attention == AttentionConfig()


@pytest.mark.parametrize("section, needle", [
    ({"sparse": {"method": "dense"}}, "attention.sparse.method"),
    ({"sparse": {"methd": "topp"}}, "did you mean 'method'"),
    ({"reorder": "random"}, "attention.reorder"),
    ({"block_size": 48}, "attention.block_size"),
    ({"warmup_steps": -1}, "attention.warmup_steps"),
    ({"dense_layers": [1, "x"]}, "attention.dense_layers"),
    ({"dense_layers": 3}, "attention.dense_layers"),
    ({"sparse": {"top_p": 1.5}}, "attention.sparse.top_p"),
    ({"sparse": {"method": "static", "density": 0.2}}, "attention.sparse.density"),
    ({"paro_orders": [["fhw", "xyz"]]}, "attention.paro_orders"),
    ({"svg2": {"q_clusters": 0}}, "attention.svg2.q_clusters"),
    ({"quant": "int4"}, "attention.quant"),
    ({"qaunt": "int8"}, "did you mean 'quant'"),
    ({"sparse": {"masks": {"grid": [1, 2, 2]}}}, "attention.sparse.masks"),
])
def test_bad_sections_name_the_field(section, needle):
    with pytest.raises(PolicyError, match=needle.replace("(", r"\(")):
        Policy.from_dict({"attention": section})


def test_uncalibrated_sections_are_refused_before_any_hook():
    pipe = tiny_pipeline("dit")
    for section in ({"reorder": "paro"}, {"sparse": {"method": "static"}}):
        with pytest.raises(PolicyError, match="calibrate"):
            dit_accel.accelerate(pipe, {"attention": section})
        assert not dit_accel.api.is_accelerated(pipe)
        assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in pipe.transformer.transformer_blocks)


def test_dense_layers_out_of_range():
    pipe = tiny_pipeline("dit")
    with pytest.raises(PolicyError, match="dense_layers"):
        dit_accel.accelerate(pipe, {"attention": {"dense_layers": [99]}})
