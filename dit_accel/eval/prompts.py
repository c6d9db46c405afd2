"""Prompt sets and class-label sets for evaluation.

Specs (``load_prompts``):

* ``builtin`` / ``builtin:N`` — the project's own 24 prompts (below), written to cover subjects, scenes,
  counting, spatial relations, text rendering and styles; the first N.
* ``parti`` / ``parti:N`` — PartiPrompts (Yu et al., 2022; 1,632 prompts, Apache-2.0). Read from
  ``PartiPrompts.tsv`` in ``$DIT_ACCEL_PROMPTS_DIR`` or the cache folder, downloaded there on first use.
  ``N`` picks N prompts evenly spaced over the file, so every category is represented.
* ``coco`` / ``coco:N`` — MS-COCO 2017 validation captions (Chen et al., 2015; CC-BY 4.0): the first
  caption of each image, images sorted by id, N evenly spaced. Read from ``captions_val2017.json`` in
  ``$DIT_ACCEL_PROMPTS_DIR`` or the cache, else the official annotation archive (~250 MB) is downloaded
  once and the captions file kept.
* a path: ``.txt`` (one prompt per line), ``.tsv`` (a ``Prompt`` column), ``.json`` (a list of strings or
  a COCO captions file); ``PATH:N`` for N evenly spaced.
* a list of strings.

Class-conditional models take class labels instead (``load_classes``): ``all``, ``N`` (ids 0..N-1) or a
list of ids / class names.
"""

from __future__ import annotations

import csv
import json
import os
import urllib.request
import zipfile
from pathlib import Path
from typing import Sequence

BUILTIN_PROMPTS: tuple[str, ...] = (
    "a red fox sitting in fresh snow at sunrise, photorealistic",
    "a bowl of ramen with a soft boiled egg, studio lighting, top view",
    "an astronaut riding a horse on the moon, digital art",
    "three yellow rubber ducks floating in a blue bathtub",
    "a lighthouse on a rocky cliff during a storm, oil painting",
    "a street market in a busy city at night, neon signs, rain",
    "a wooden sign that says OPEN in white letters",
    "a cat sleeping on a stack of old books next to a window",
    "a futuristic train crossing a glass bridge over a canyon",
    "a watercolor painting of a small village by a lake in autumn",
    "a close up portrait of an old fisherman with a grey beard",
    "a red cube on top of a blue sphere on a green table",
    "a panda eating bamboo in a misty forest",
    "a cup of coffee and a croissant on a marble table, morning light",
    "a sailing ship in a bottle on a desk",
    "an isometric 3d render of a tiny island with palm trees",
    "two dogs playing with a ball in a park, summer",
    "a snowy mountain range under a starry night sky, long exposure",
    "a robot reading a newspaper in a cafe, cinematic",
    "a field of sunflowers with a single tree in the middle",
    "a black and white photo of a bicycle leaning against a brick wall",
    "a dragon made of glass flying over a desert",
    "a plate of colorful macarons arranged in a circle",
    "an owl wearing a tiny hat, children's book illustration",
)

PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
COCO_CAPTIONS_MEMBER = "annotations/captions_val2017.json"


def cache_dir() -> Path:
    """``$DIT_ACCEL_CACHE`` or ``~/.cache/dit_accel``."""
    return Path(os.environ.get("DIT_ACCEL_CACHE") or Path.home() / ".cache" / "dit_accel")


def fetch(url: str, dest: str | Path, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` once (atomic: a partial download never looks finished)."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    from tqdm.auto import tqdm

    with tqdm(unit="B", unit_scale=True, desc=f"download {dest.name}", disable=not progress) as bar:
        def hook(blocks: int, block_size: int, total: int) -> None:
            if total > 0:
                bar.total = total
            bar.update(blocks * block_size - bar.n)

        try:
            urllib.request.urlretrieve(url, tmp, reporthook=hook)
        except Exception:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, dest)
    return dest


def _find(filename: str) -> Path | None:
    dirs = [os.environ.get("DIT_ACCEL_PROMPTS_DIR"), cache_dir() / "prompts"]
    for d in dirs:
        if d and (Path(d) / filename).is_file():
            return Path(d) / filename
    return None


def evenly_spaced(items: Sequence, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` is None or too large)."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ValueError(f"asked for {n} prompts; need at least 1")
    return [items[i * len(items) // n] for i in range(n)]


def parti_prompts(n: int | None = None) -> list[str]:
    path = _find("PartiPrompts.tsv") or fetch(PARTI_URL, cache_dir() / "prompts" / "PartiPrompts.tsv")
    return evenly_spaced(_read_tsv(path), n)


def coco_captions(n: int | None = None) -> list[str]:
    path = _find("captions_val2017.json")
    if path is None:
        path = cache_dir() / "prompts" / "captions_val2017.json"
        archive = fetch(COCO_ANNOTATIONS_URL, cache_dir() / "downloads" / "annotations_trainval2017.zip")
        with zipfile.ZipFile(archive) as zf:
            data = zf.read(COCO_CAPTIONS_MEMBER)
        tmp = path.with_name(path.name + f".part{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return evenly_spaced(_read_json(path), n)


def _read_tsv(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "Prompt" not in rows[0]:
        raise ValueError(f"{path}: expected a tab-separated file with a 'Prompt' column")
    return [r["Prompt"].strip() for r in rows if r["Prompt"] and r["Prompt"].strip()]


def _read_json(path: Path) -> list[str]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return data
    if isinstance(data, dict) and "annotations" in data:  # COCO captions format
        first: dict[int, tuple[int, str]] = {}
        for ann in data["annotations"]:
            key = (ann["id"], ann["caption"].strip())
            if ann["image_id"] not in first or key < first[ann["image_id"]]:
                first[ann["image_id"]] = key
        return [first[i][1] for i in sorted(first)]
    raise ValueError(f"{path}: expected a JSON list of prompts or a COCO captions file")


NAMED_SETS = ("builtin", "parti", "coco")


def _split(spec: str) -> tuple[str, int | None]:
    """``NAME[:N]`` -> (NAME, N); a path that itself contains ':' stays whole."""
    name, _, count = spec.partition(":")
    n = None
    if count:
        if not count.isdigit():
            if Path(spec).is_file():  # a path that contains ':'
                return spec, None
            raise ValueError(f"prompts {spec!r}: expected NAME or NAME:N with N a positive integer")
        n = int(count)
    if n is not None and n < 1:
        raise ValueError(f"prompts {spec!r}: need at least 1 prompt")
    return name, n


def resolve_spec(spec: object, base_dir: str | os.PathLike | None = None) -> object:
    """``spec`` with a relative prompt file (``FILE`` or ``FILE:N``) that is not in the working directory but is
    in ``base_dir`` (a sweep file's folder) made absolute; anything else unchanged."""
    if not isinstance(spec, str) or base_dir is None or spec.partition(":")[0] in NAMED_SETS:
        return spec
    try:
        name, n = _split(spec)
    except ValueError:
        return spec  # check_prompts says what is wrong with it
    if Path(name).is_absolute() or Path(name).is_file():
        return spec
    candidate = Path(base_dir) / name
    if candidate.is_file():
        return str(candidate.resolve()) + (f":{n}" if n is not None else "")
    return spec


def check_prompts(spec: object) -> None:
    """Raise ValueError unless ``spec`` resolves to at least one prompt. Local files are read; the named
    downloadable sets (``parti``, ``coco``) are only checked for their syntax (nothing is downloaded)."""
    if isinstance(spec, str):
        name, _ = _split(spec)
        if name in ("parti", "coco"):
            return
    load_prompts(spec)  # type: ignore[arg-type]


def load_prompts(spec: str | Sequence[str]) -> list[str]:
    """Resolve a prompt-set spec (see the module docstring) into a list of prompts (at least one)."""
    if not isinstance(spec, str):
        if not isinstance(spec, (list, tuple)):
            raise ValueError(f"prompts: expected a prompt-set name, a file or a list of strings, got {spec!r}")
        prompts = list(spec)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            bad = next((p for p in prompts if not isinstance(p, str)), None)
            raise ValueError("prompts: expected a non-empty list of strings or a prompt-set name"
                             + (f" ({bad!r} is not a string)" if prompts else ""))
        return prompts
    prompts = _load_named(spec)
    if not prompts:
        raise ValueError(f"prompts {spec!r}: the set holds no prompts")
    return prompts


def _load_named(spec: str) -> list[str]:
    name, _, count = spec.partition(":")
    n = None
    if count:
        if not count.isdigit():
            if Path(spec).is_file():  # a path that contains ':'
                name, n = spec, None
            else:
                raise ValueError(f"prompts {spec!r}: expected NAME or NAME:N with N a positive integer")
        else:
            n = int(count)
    if n is not None and n < 1:
        raise ValueError(f"prompts {spec!r}: need at least 1 prompt")
    if name == "builtin":
        return list(BUILTIN_PROMPTS[:n])
    if name == "parti":
        return parti_prompts(n)
    if name == "coco":
        return coco_captions(n)
    path = Path(name)
    if path.is_file():
        if path.suffix == ".tsv":
            return evenly_spaced(_read_tsv(path), n)
        if path.suffix == ".json":
            return evenly_spaced(_read_json(path), n)
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return evenly_spaced([ln for ln in lines if ln], n)
    raise ValueError(f"unknown prompt set {spec!r}: use builtin[:N], parti[:N], coco[:N], a .txt/.tsv/.json path "
                     "or a list of prompts")


def check_classes(spec: object) -> None:
    """Raise ValueError unless ``spec`` has the form :func:`load_classes` takes (no model needed): ``all``,
    a count >= 1, or a non-empty list of ids (integers >= 0) and names."""
    if spec == "all" or spec is None:
        return
    if isinstance(spec, bool) or not isinstance(spec, (int, str, list, tuple)):
        raise ValueError(f"classes: expected 'all', a count or a list of class ids / names, got {spec!r}")
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        if int(spec) < 1:
            raise ValueError(f"classes: expected at least 1, got {int(spec)}")
        return
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("classes: the list is empty; give class ids, names, a count or 'all'")
    for c in items:
        if isinstance(c, bool) or not (isinstance(c, int) and c >= 0 or isinstance(c, str) and c):
            raise ValueError(f"classes: {c!r} is not a class id (an integer >= 0) or a class name")


def load_classes(spec: int | str | Sequence[int | str], num_classes: int,
                 names: Sequence[str] | None = None) -> list[int]:
    """Class ids for a class-conditional model: ``"all"``, ``N`` (ids 0..N-1) or a list of ids / names."""
    check_classes(spec)
    if spec == "all" or spec is None:
        return list(range(num_classes))
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        n = int(spec)
        if not 1 <= n:
            raise ValueError(f"classes: expected at least 1, got {n}")
        return [i % num_classes for i in range(n)]
    if isinstance(spec, str):
        spec = [spec]
    ids = []
    lookup = {name: i for i, name in enumerate(names or [])}
    for c in spec:
        if isinstance(c, str) and not c.isdigit():
            if c not in lookup:
                known = list(lookup)
                shown = f"{known[:20]} ... ({len(known)} in all)" if len(known) > 20 else f"{known}"
                raise ValueError(f"classes: {c!r} is not a class of this model; classes: {shown}")
            ids.append(lookup[c])
        else:
            i = int(c)
            if not 0 <= i < num_classes:
                raise ValueError(f"classes: id {i} out of range for a model with {num_classes} classes")
            ids.append(i)
    return ids
