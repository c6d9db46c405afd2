"""Prompt sets: built-in, PartiPrompts (shared copy), COCO captions, files, class labels, cached downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dit_accel.eval import prompts

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"


def test_builtin():
    assert prompts.load_prompts("builtin") == list(prompts.BUILTIN_PROMPTS)
    assert prompts.load_prompts("builtin:3") == list(prompts.BUILTIN_PROMPTS[:3])
    assert len(set(prompts.BUILTIN_PROMPTS)) == len(prompts.BUILTIN_PROMPTS) >= 16
    assert prompts.load_prompts(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompts.load_prompts("nope")
    with pytest.raises(ValueError, match="at least 1"):
        prompts.load_prompts("builtin:0")


@pytest.mark.skipif(not (SHARED / "PartiPrompts.tsv").is_file(), reason="no shared copy of PartiPrompts")
def test_parti_from_prompts_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ACCEL_PROMPTS_DIR", str(SHARED))
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))  # nothing may be downloaded into it
    everything = prompts.load_prompts("parti")
    assert len(everything) == 1632 and everything[0] == "bond"
    some = prompts.load_prompts("parti:8")
    assert len(some) == 8 and some == [everything[i * 1632 // 8] for i in range(8)]
    assert not any(tmp_path.iterdir())


def test_coco_captions_file_and_download_cache(monkeypatch, tmp_path):
    coco = {"annotations": [{"id": 5, "image_id": 2, "caption": "two b"}, {"id": 3, "image_id": 2, "caption": "two a"},
                            {"id": 1, "image_id": 1, "caption": " one "}]}
    src = tmp_path / "src"
    src.mkdir()
    (src / "captions_val2017.json").write_text(json.dumps(coco))
    monkeypatch.setenv("DIT_ACCEL_PROMPTS_DIR", str(src))
    assert prompts.load_prompts("coco") == ["one", "two a"]  # first caption (lowest id) per image, by image id
    assert prompts.load_prompts("coco:1") == ["one"]
    # the download path: the official archive, fetched once into the cache (a file:// URL stands in)
    import zipfile

    archive = tmp_path / "annotations.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(prompts.COCO_CAPTIONS_MEMBER, json.dumps(coco))
    monkeypatch.delenv("DIT_ACCEL_PROMPTS_DIR")
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prompts, "COCO_ANNOTATIONS_URL", archive.as_uri())
    assert prompts.load_prompts("coco") == ["one", "two a"]
    archive.unlink()  # a second call reads the cache
    assert prompts.load_prompts("coco:2") == ["one", "two a"]


def test_fetch_is_atomic_and_cached(tmp_path):
    src = tmp_path / "a.tsv"
    src.write_text("Prompt\tCategory\nx\ty\n")
    dest = prompts.fetch(src.as_uri(), tmp_path / "cache" / "a.tsv", progress=False)
    assert dest.read_text() == src.read_text()
    src.unlink()
    assert prompts.fetch(src.as_uri(), dest, progress=False) == dest
    with pytest.raises(Exception):
        prompts.fetch((tmp_path / "missing").as_uri(), tmp_path / "cache" / "b.tsv", progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a.tsv"]  # no partial file left


def test_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\nthird\n")
    assert prompts.load_prompts(str(tmp_path / "p.txt")) == ["first", "second", "third"]
    assert prompts.load_prompts(f"{tmp_path / 'p.txt'}:2") == ["first", "second"]
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\nalpha\tx\nbeta\ty\n")
    assert prompts.load_prompts(str(tmp_path / "p.tsv")) == ["alpha", "beta"]
    (tmp_path / "p.json").write_text('["u", "v"]')
    assert prompts.load_prompts(str(tmp_path / "p.json")) == ["u", "v"]


def test_classes():
    names = ["cat", "dog", "ship"]
    assert prompts.load_classes("all", 3) == [0, 1, 2]
    assert prompts.load_classes(5, 3) == [0, 1, 2, 0, 1]
    assert prompts.load_classes(["ship", 0], 3, names) == [2, 0]
    with pytest.raises(ValueError, match="not a class"):
        prompts.load_classes(["horse"], 3, names)
    with pytest.raises(ValueError, match="out of range"):
        prompts.load_classes([7], 3, names)
