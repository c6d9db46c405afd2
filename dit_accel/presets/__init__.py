"""The shipped presets: one ``NAME.yaml`` policy file each (loaded by ``dit_accel.load_policy(NAME)``)."""

from importlib import resources


def preset_names() -> list[str]:
    """Names of the presets shipped inside the package (reading them imports no torch)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
