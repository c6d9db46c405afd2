"""Policy: a validated, serialisable acceleration recipe, and the loaders for presets and YAML.

A policy is built from a shipped preset name (``dit_accel/presets/NAME.yaml``), a YAML path,
a dict, or given directly. ``Policy.to_dict()`` / ``Policy.from_dict()`` round-trip exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from .attention.config import AttentionConfig
from .calibrated_for import CalibratedFor
from .compile_config import CompileConfig
from .config import ConfigBase, PolicyError, unknown_key_error
from .guardrail_config import GuardrailConfig
from .memory_config import MemoryConfig
from .caching.base import CacheConfig, cache_config_from_dict, guidance_config_from_dict, guidance_config_types
from .presets import preset_names  # noqa: F401  (re-exported: dit_accel.preset_names)
from .quant.config import LinearQuantConfig

PolicyLike = Union["Policy", str, Path, Mapping[str, Any], None]


@dataclass(frozen=True)
class Policy:
    """What to accelerate and how. ``cache=None`` means no caching, ``guidance=None`` plain CFG,
    ``attention=None`` dense attention (with all off, outputs stay bit-exact)."""

    name: str = "custom"
    cache: ConfigBase | None = None
    guidance: ConfigBase | None = None
    attention: AttentionConfig | None = None
    quant: LinearQuantConfig | None = None  # linear layers through torchao (dit_accel.quant)
    calibrated_for: CalibratedFor | None = None  # what dit_accel.calibrate ran on (checked when applied)
    compile: CompileConfig | None = None  # regional torch.compile of the blocks, applied by accelerate
    guardrails: GuardrailConfig | None = None  # fall back to computing on unfamiliar calls (dit_accel.guardrail_config)
    memory: MemoryConfig | None = None  # FFN over slices of the tokens: lower peak memory (dit_accel.memory_config)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PolicyError(f"name: expected a non-empty string, got {self.name!r}")
        if self.cache is not None and not isinstance(self.cache, CacheConfig):
            if isinstance(self.cache, ConfigBase):
                raise PolicyError(f"cache: expected a caching method's section, got {type(self.cache).__name__}")
            object.__setattr__(self, "cache", cache_config_from_dict(self.cache))
        if self.guidance is not None and not isinstance(self.guidance, guidance_config_types()):
            if isinstance(self.guidance, ConfigBase):
                raise PolicyError(f"guidance: expected a guidance section, got {type(self.guidance).__name__}")
            object.__setattr__(self, "guidance", guidance_config_from_dict(self.guidance))
        if self.attention is not None and not isinstance(self.attention, AttentionConfig):
            if isinstance(self.attention, ConfigBase):
                raise PolicyError(f"attention: expected an attention section, got {type(self.attention).__name__}")
            object.__setattr__(self, "attention", AttentionConfig.from_dict(self.attention))
        if self.quant is not None and not isinstance(self.quant, LinearQuantConfig):
            if isinstance(self.quant, ConfigBase):
                raise PolicyError(f"quant: expected a quant section, got {type(self.quant).__name__}")
            object.__setattr__(self, "quant", LinearQuantConfig.from_dict(self.quant))
        if self.compile is not None and not isinstance(self.compile, CompileConfig):
            if isinstance(self.compile, ConfigBase):
                raise PolicyError(f"compile: expected a compile section, got {type(self.compile).__name__}")
            object.__setattr__(self, "compile", CompileConfig.from_dict(self.compile))
        if self.guardrails is not None and not isinstance(self.guardrails, GuardrailConfig):
            if isinstance(self.guardrails, ConfigBase):
                raise PolicyError(f"guardrails: expected a guardrails section, got {type(self.guardrails).__name__}")
            object.__setattr__(self, "guardrails", GuardrailConfig.from_dict(self.guardrails))
        if self.memory is not None and not isinstance(self.memory, MemoryConfig):
            if isinstance(self.memory, ConfigBase):
                raise PolicyError(f"memory: expected a memory section, got {type(self.memory).__name__}")
            object.__setattr__(self, "memory", MemoryConfig.from_dict(self.memory))
        if self.calibrated_for is not None and not isinstance(self.calibrated_for, CalibratedFor):
            if isinstance(self.calibrated_for, ConfigBase):
                raise PolicyError("calibrated_for: expected a calibration record, got "
                                  f"{type(self.calibrated_for).__name__}")
            object.__setattr__(self, "calibrated_for", CalibratedFor.from_dict(self.calibrated_for))
        if self.cache is not None:  # a method calibrated for one quantization (CacheQuant) checks the quant section
            self.cache.check_sections(quant=self.quant)

    @property
    def is_empty(self) -> bool:
        return (self.cache is None and self.guidance is None and self.attention is None and self.quant is None
                and self.compile is None and self.memory is None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        if not isinstance(data, Mapping):
            raise PolicyError(f"policy: expected a mapping, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in allowed:
                raise unknown_key_error("policy", key, allowed)
        cache, guidance, attention = data.get("cache"), data.get("guidance"), data.get("attention")
        return cls(name=data.get("name", "custom"), cache=None if cache is None else cache_config_from_dict(cache),
                   guidance=None if guidance is None else guidance_config_from_dict(guidance),
                   attention=None if attention is None else AttentionConfig.from_dict(attention),
                   quant=None if data.get("quant") is None else LinearQuantConfig.from_dict(data["quant"]),
                   calibrated_for=None if data.get("calibrated_for") is None
                   else CalibratedFor.from_dict(data["calibrated_for"]),
                   compile=None if data.get("compile") is None else CompileConfig.from_dict(data["compile"]),
                   guardrails=None if data.get("guardrails") is None
                   else GuardrailConfig.from_dict(data["guardrails"]),
                   memory=None if data.get("memory") is None else MemoryConfig.from_dict(data["memory"]))

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "cache"}``, plus ``"guidance"`` when the policy has a guidance section."""
        d = {"name": self.name, "cache": None if self.cache is None else self.cache.to_dict()}
        if self.guidance is not None:
            d["guidance"] = self.guidance.to_dict()
        if self.attention is not None:
            d["attention"] = self.attention.to_dict()
        if self.quant is not None:
            d["quant"] = self.quant.to_dict()
        if self.compile is not None:
            d["compile"] = self.compile.to_dict()
        if self.calibrated_for is not None:
            d["calibrated_for"] = self.calibrated_for.to_dict()
        if self.guardrails is not None:
            d["guardrails"] = self.guardrails.to_dict()
        if self.memory is not None:
            d["memory"] = self.memory.to_dict()
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path, inline: bool = False) -> Path | None:
        """Write the policy as YAML at ``path``. Long numeric calibration fields (≥ 16 numbers: ratio
        curves, per-step tables, schedules) go to ``NAME.yaml.safetensors`` beside it, referenced from the
        YAML (``dit_accel.sidecar``); ``inline=True`` keeps everything in the YAML. Returns the sidecar path
        or None. A file at the sidecar's name that dit_accel did not write is never replaced or deleted:
        that is a PolicyError, and nothing is written."""
        from . import sidecar

        return sidecar.save(self.to_dict(), path, inline=inline)

    def save_pretrained(self, folder: str | Path, card: Mapping[str, Any] | None = None) -> Path:
        """Save as a shareable folder: ``policy.yaml`` + sidecar + a model card ``README.md`` (``card``: extra
        headings -> tables, e.g. what it was measured at; :mod:`dit_accel.policy_folder`). Returns the folder."""
        from . import policy_folder

        return policy_folder.save_folder(self.to_dict(), folder, card)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, revision: str | None = None) -> "Policy":
        """Load a folder written by :meth:`save_pretrained`, a policy YAML, or a Hugging Face Hub repository holding
        one (downloaded with ``huggingface_hub.snapshot_download``)."""
        from . import policy_folder

        return cls.from_dict(policy_folder.load_folder(path_or_hub_id, revision))

    def replace(self, **cache_changes: Any) -> "Policy":
        """A copy with some cache fields changed, validated again: ``policy.replace(threshold=0.2)``."""
        if self.cache is None:
            raise PolicyError("policy has no cache section to change")
        return dataclasses.replace(self, cache=cache_config_from_dict({**self.cache.to_dict(), **cache_changes}))


def load_policy(spec: PolicyLike) -> Policy:
    """Resolve a preset name, YAML path, dict, ``Policy`` or ``None`` (no acceleration) into a Policy."""
    if spec is None:
        return Policy(name="none")
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        return Policy.from_dict(spec)
    if isinstance(spec, (str, Path)):
        name = str(spec)
        if isinstance(spec, str) and name in preset_names():
            data = yaml.safe_load(resources.files("dit_accel.presets").joinpath(f"{name}.yaml").read_text())
            return Policy.from_dict(data)
        path = Path(spec)
        if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
            from . import sidecar

            data = sidecar.load_yaml(path)  # bounded; a PolicyError for anything that is not plain YAML data
            if not isinstance(data, Mapping):
                hint = (f"; to use the shipped preset {data!r}, pass its name: load_policy({data!r})"
                        if isinstance(data, str) and data in preset_names() else "")
                raise PolicyError(f"policy file {str(path)!r} holds a {type(data).__name__} ({str(data)[:60]!r}), not "
                                  "a mapping of policy sections (name:, cache:, guidance:, attention:, quant:)" + hint)
            return Policy.from_dict(sidecar.load(data, path))
        raise PolicyError(f"unknown preset {name!r}; shipped presets: {', '.join(preset_names())} "
                          "(or pass a YAML path, a dict or a dit_accel.Policy)")
    raise PolicyError(f"cannot build a policy from {type(spec).__name__}; pass a preset name, YAML path, dict or "
                      "Policy")
