"""The results store: append-only rows, exact dedup, torn lines, shards of several processes, outputs."""

from __future__ import annotations

import json

import torch

from dit_accel.eval.store import ResultStore


def test_rows_are_appended_once(tmp_path):
    store = ResultStore(tmp_path / "s")
    assert store.add("sample", "k1", {"psnr": 30.0})
    assert not store.add("sample", "k1", {"psnr": 99.0})  # already stored: nothing written
    assert store.add("config", "k1", {"speedup": float("inf")})  # tables are separate
    again = ResultStore(tmp_path / "s")
    assert again.get("sample", "k1")["psnr"] == 30.0
    assert again.get("config", "k1")["speedup"] == float("inf")
    lines = store.shard_path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["key"] == "k1"


def test_torn_line_is_skipped_and_terminated(tmp_path):
    store = ResultStore(tmp_path)
    store.add("sample", "a", {"x": 1})
    with open(store.shard_path, "ab") as f:
        f.write(b'{"table": "sample", "key": "b", "x"')  # a writer killed mid-line
    assert ResultStore(tmp_path).keys("sample") == {"a"}
    store.add("sample", "c", {"x": 3})  # terminates the torn line first
    assert ResultStore(tmp_path).keys("sample") == {"a", "c"}


def test_shards_of_several_processes_merge(tmp_path):
    r0, r1 = ResultStore(tmp_path, rank=0), ResultStore(tmp_path, rank=1)
    r0.add("sample", "a", {"by": 0})
    r1.add("sample", "b", {"by": 1})
    r1.add("sample", "a", {"by": 1})  # r1 has not seen r0's row yet: a duplicate line on disk
    merged = ResultStore(tmp_path)
    assert merged.keys("sample") == {"a", "b"}
    assert len(merged.rows("sample")) == 2
    r1.refresh()
    assert not r1.add("sample", "a", {"by": 1})


def test_outputs_round_trip(tmp_path):
    store = ResultStore(tmp_path)
    x = torch.randn(1, 4, 3)
    store.save_output("abcdef", {"output": x, "stats": {"blocks_computed_share": 0.5}, "seconds": 1.0})
    assert store.has_output("abcdef") and not store.has_output("abcdeg")
    record = store.load_output("abcdef")
    assert torch.equal(record["output"], x) and record["stats"]["blocks_computed_share"] == 0.5
    assert not list(store.output_path("abcdef").parent.glob("*.tmp"))


def test_outputs_are_saved_viewable_beside_the_record(tmp_path):
    from PIL import Image

    store = ResultStore(tmp_path)
    images = torch.rand(2, 3, 8, 8)
    store.save_output("aa01", {"output": images, "stats": {}, "seconds": 0.1}, media="image")
    png = store.media_path("aa01")
    assert png.suffix == ".png" and png.parent == store.output_path("aa01").parent
    with Image.open(png) as im:
        assert im.size == (16, 8)  # the two images side by side
    assert torch.equal(store.load_output("aa01")["output"], images)  # the record stays what reports read

    video = torch.rand(1, 4, 3, 8, 8)  # [B, F, C, H, W]
    store.save_output("bb01", {"output": video, "stats": {}, "seconds": 0.1}, media="video")
    clip = store.media_path("bb01")
    assert clip.suffix in (".mp4", ".gif")
    if clip.suffix == ".gif":  # PIL, when no video writer (imageio + imageio-ffmpeg) is installed
        with Image.open(clip) as im:
            assert im.n_frames == 4 and im.size == (8, 8)

    store.save_output("cc01", {"output": torch.randn(1, 4, 2, 2), "stats": {}, "seconds": 0.1}, media="latent")
    assert store.media_path("cc01") is None and store.has_output("cc01")
    assert not list(tmp_path.rglob("*.tmp*"))
