"""Shareable policy folders: ``policy.yaml`` + its calibration sidecar + a small model card (``README.md``).

``Policy.save_pretrained(folder, card=...)`` writes::

    folder/policy.yaml                 the recipe (dit_accel.sidecar: long tables go to the sidecar)
    folder/policy.yaml.safetensors     calibration tables and guardrail ranges (only when there are any)
    folder/README.md                   model card: YAML metadata (library_name, tags) + what the policy was
                                       calibrated / tuned on and what was measured

``Policy.from_pretrained(path_or_hub_id, revision=None)`` reads a local folder (or a ``policy.yaml`` path), or
downloads the three files of a Hugging Face Hub repository with ``huggingface_hub.snapshot_download`` (nothing
else in the repository is fetched) and reads them the same way: through :func:`dit_accel.sidecar.load_yaml`,
bounded and safe, as every policy file. Share a folder with ``huggingface_hub.upload_folder(repo_id=...,
folder_path=folder)``.

The card is written with ``huggingface_hub.ModelCard`` / ``ModelCardData`` (the Hub's own format); ``card``
is a mapping of headings to mappings (or text), e.g. ``{"Calibrated on": {"model": ..., "prompts": 8},
"Measured": {"speed-up": "2.1x", "PSNR": "33.0 dB"}}``, rendered as tables.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from .config import PolicyError

POLICY_FILE = "policy.yaml"
CARD_FILE = "README.md"
HUB_FILES = [POLICY_FILE, POLICY_FILE + ".safetensors", CARD_FILE]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # organisation/name


def save_folder(data: dict, folder: str | Path, card: Mapping[str, Any] | None = None) -> Path:
    """Write the policy dict ``data`` into ``folder`` (created; existing policy files in it are replaced, any other
    file is left alone). Returns the folder."""
    from . import sidecar

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PolicyError(f"cannot save a policy folder at {str(folder)!r}: it is a file")
    folder.mkdir(parents=True, exist_ok=True)
    text = render_card(data, card)  # before anything is written: a bad card writes nothing
    sidecar.save(data, folder / POLICY_FILE)
    (folder / CARD_FILE).write_text(text)
    return folder


def render_card(data: dict, card: Mapping[str, Any] | None = None) -> str:
    """The model card text of the policy dict ``data`` (see the module docstring for ``card``)."""
    from huggingface_hub import ModelCard, ModelCardData

    if card is not None and not isinstance(card, Mapping):
        raise PolicyError(f"card: expected a mapping of headings to tables or text, got {type(card).__name__}")
    name = str(data.get("name", "policy"))
    sections = [key for key in ("cache", "guidance", "attention", "quant", "compile", "guardrails",
                                 "memory")
                if data.get(key) is not None]
    meta = ModelCardData(library_name="dit_accel", tags=["dit-accel", "diffusion", "acceleration-policy"])
    lines = [f"# {name}", "", "A dit_accel acceleration policy for diffusers pipelines "
             f"(sections: {', '.join(sections) or 'none'}).", "", "```python", "import dit_accel",
             "policy = dit_accel.Policy.from_pretrained(\"PATH_OR_HUB_ID\")",
             "dit_accel.accelerate(pipe, policy)", "```", ""]
    recipe = {}
    if isinstance(data.get("cache"), Mapping):
        recipe.update({f"cache.{k}": v for k, v in data["cache"].items() if _short(v)})
    if isinstance(data.get("guidance"), Mapping):
        recipe.update({f"guidance.{k}": v for k, v in data["guidance"].items() if _short(v)})
    made_for = data.get("calibrated_for") or {}
    guard = data.get("guardrails") or {}
    recorded = {k: v for k, v in {**made_for, **{k: guard.get(k) for k in ("model", "blocks", "calls",
                                                                             "sample_shape", "scheduler")}}.items()
                if v not in (None, [], ())}
    for title, table in (("Recipe", recipe), ("Recorded for", recorded), *(card or {}).items()):
        if not table:
            continue
        lines += [f"## {title}", ""]
        if isinstance(table, Mapping):
            lines += ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in table.items()), ""]
        else:
            lines += [str(table), ""]
    if guard:
        lines += ["Guardrails are on: calls unlike the recorded ones compute instead of reusing "
                  "(counted in `dit_accel.stats(pipe).extra[\"guardrails\"]`).", ""]
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _short(value: Any) -> bool:
    return not isinstance(value, (list, tuple, dict)) or len(str(value)) <= 60


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def resolve(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """The ``policy.yaml`` of a local folder, a local YAML path, or a Hub repository (downloaded)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        target = path / POLICY_FILE
        if not target.is_file():
            raise PolicyError(f"{str(path)!r} is a folder without a {POLICY_FILE} (save one with "
                              "Policy.save_pretrained)")
        return target
    if path.is_file():
        return path
    if isinstance(path_or_hub_id, str) and HUB_ID.match(path_or_hub_id):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(repo_id=path_or_hub_id, revision=revision, allow_patterns=HUB_FILES)
        except Exception as err:  # offline, unknown repository, no access: one clear error
            raise PolicyError(f"cannot download policy {path_or_hub_id!r} from the Hugging Face Hub: {err}") from None
        return resolve(local)
    raise PolicyError(f"no policy folder or file at {str(path_or_hub_id)!r} (and it is not a Hub id "
                      "'organisation/name')")


def load_folder(path_or_hub_id: str | Path, revision: str | None = None) -> dict:
    """The policy dict of a folder, YAML path or Hub repository (sidecar resolved)."""
    from . import sidecar

    path = resolve(path_or_hub_id, revision)
    data = sidecar.load_yaml(path)
    if not isinstance(data, dict):
        raise PolicyError(f"policy file {str(path)!r} holds a {type(data).__name__}, not a mapping of policy sections")
    return sidecar.load(data, path)
