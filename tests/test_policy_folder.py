"""Shareable policy folders: Policy.save_pretrained / Policy.from_pretrained (dit_accel.policy_folder)."""

from __future__ import annotations

import math

import pytest
import yaml

import dit_accel
from dit_accel.config import PolicyError
from dit_accel.policy_folder import CARD_FILE, POLICY_FILE

RATIOS = [1.0] + [0.9 + 0.001 * i for i in range(23)]
GUARD = {"margin": 0.5, "calls": 24, "model": "DiTTransformer2DModel", "blocks": 4, "sample_shape": [4, 8, 8],
         "scheduler": "DDIMScheduler",
         "input_change": {"default": {"lo": [math.nan] + [0.01 * i for i in range(1, 24)],
                                      "hi": [math.nan] + [0.02 * i for i in range(1, 24)]}}}


def _policy() -> dit_accel.Policy:
    return dit_accel.Policy.from_dict({"name": "tuned-magcache", "cache": {"method": "magcache", "threshold": 0.2,
                                                                           "mag_ratios": {"default": RATIOS}},
                                       "guardrails": GUARD})


def test_round_trip_through_a_folder(tmp_path):
    policy = _policy()
    folder = policy.save_pretrained(tmp_path / "p", card={"Measured": {"speed-up": "2.1x (compute bound)",
                                                                      "PSNR": "33.0 dB"}})
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted([POLICY_FILE, POLICY_FILE + ".safetensors", CARD_FILE])
    assert "$sidecar" in (folder / POLICY_FILE).read_text()  # the long tables moved to the sidecar
    loaded = dit_accel.Policy.from_pretrained(folder)
    assert loaded == policy, "nan marks in the guardrail tables compare equal after a round trip"
    assert dit_accel.Policy.from_pretrained(str(folder / POLICY_FILE)) == policy
    card = (folder / CARD_FILE).read_text()
    assert card.startswith("---\n") and "library_name: dit_accel" in card
    assert "| PSNR | 33.0 dB |" in card and "DiTTransformer2DModel" in card and "cache.threshold" in card


def test_policies_with_nan_marks_from_yaml_compare_equal():
    """``.nan`` parsed from YAML (a new float object each time) equals the calibration's ``math.nan``; a real
    difference in the table still makes the policies differ."""
    text = yaml.safe_dump(_policy().to_dict())
    assert ".nan" in text
    assert dit_accel.Policy.from_dict(yaml.safe_load(text)) == dit_accel.Policy.from_dict(yaml.safe_load(text))
    assert dit_accel.Policy.from_dict(yaml.safe_load(text)) == _policy()
    other = yaml.safe_load(text)
    other["guardrails"]["input_change"]["default"]["hi"][3] += 0.5
    assert dit_accel.Policy.from_dict(other) != _policy()


def test_saving_again_replaces_and_keeps_other_files(tmp_path):
    folder = tmp_path / "p"
    _policy().save_pretrained(folder)
    (folder / "notes.txt").write_text("mine")
    dit_accel.Policy(name="plain", cache={"method": "fora", "interval": 3}).save_pretrained(folder)
    assert not (folder / (POLICY_FILE + ".safetensors")).exists()  # its stale sidecar went with it
    assert (folder / "notes.txt").read_text() == "mine"
    assert dit_accel.Policy.from_pretrained(folder).name == "plain"


def test_clear_errors(tmp_path):
    with pytest.raises(PolicyError, match="without a policy.yaml"):
        dit_accel.Policy.from_pretrained(tmp_path)
    with pytest.raises(PolicyError, match="no policy folder or file"):
        dit_accel.Policy.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PolicyError, match="it is a file"):
        _policy().save_pretrained(tmp_path / "file")
    with pytest.raises(PolicyError, match="card"):
        _policy().save_pretrained(tmp_path / "q", card=["not", "a", "mapping"])
    assert not (tmp_path / "q" / POLICY_FILE).exists()  # nothing half-written


def test_hub_ids_go_through_snapshot_download(tmp_path, monkeypatch):
    """The Hub path: only the policy files are requested; the download's folder is read like a local one."""
    import huggingface_hub

    _policy().save_pretrained(tmp_path / "snap")
    calls = {}

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = dit_accel.Policy.from_pretrained("someone/flux-policy", revision="v1")
    assert loaded == _policy()
    assert calls == {"repo_id": "someone/flux-policy", "revision": "v1",
                     "allow_patterns": [POLICY_FILE, POLICY_FILE + ".safetensors", CARD_FILE]}
