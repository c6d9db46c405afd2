"""The results store: a folder of append-only JSON-lines files plus the generated outputs.

Layout of ``STORE/``::

    rows/<host>-<pid>-r<rank>.jsonl   one file per writing process: {"table": ..., "key": ..., ...} per line
    outputs/<kk>/<key>.pt             one generation record ({"output": tensor, "stats", "seconds"}) per key
    outputs/<kk>/<key>.png | .gif | .mp4   the same output, viewable: images side by side (PNG); videos as MP4
                                      when imageio with its ffmpeg plugin is installed, else GIF (PIL); none
                                      for latents. The ``.pt`` stays what reports, FID and resuming read.

Every row has a ``key`` (a hash of everything that determines it) and belongs to a ``table``
(``sample`` — one generated sample and its metrics — or ``config`` — one configuration's timing and
aggregate metrics). A row is written only once its work is finished, as a single line flushed and
fsynced, so a killed run loses at most the row being computed; a torn last line is skipped on read and
terminated before the next append. Each process appends to its own file, so processes of a
multi-GPU or multi-node run never write to the same file; reading takes the union of all files and keeps
the first row of each key, so nothing is duplicated when a run is resumed. A store opened with
``persist=False`` reads the folder but keeps what it is given in memory (the non-writing ranks of a
context-parallel sweep, which compute everything rank 0 records).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Iterable

import torch

TABLES = ("sample", "config")


class ResultStore:
    """Read and append rows; save and load generated outputs. ``rank`` names this process's shard file;
    ``persist=False`` keeps added rows and saved outputs in memory instead of writing them."""

    def __init__(self, root: str | os.PathLike, rank: int = 0, persist: bool = True) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"results store {str(self.root)!r} exists and is not a folder")
        self.rank = rank
        self.persist = persist
        self._memory_outputs: dict[str, dict[str, Any]] = {}
        self._file: Path | None = None
        self._rows: dict[str, dict[str, dict]] = {}
        self.refresh()

    # ------------------------------------------------------------------ rows
    @property
    def shard_path(self) -> Path:
        if self._file is None:
            name = f"{socket.gethostname()}-{os.getpid()}-r{self.rank}.jsonl"
            self._file = self.root / "rows" / name
        return self._file

    def refresh(self) -> None:
        """Re-read every shard (rows written by other processes become visible)."""
        rows: dict[str, dict[str, dict]] = {t: {} for t in TABLES}
        for path in sorted((self.root / "rows").glob("*.jsonl")):
            for row in _read_lines(path):
                table, key = row.get("table"), row.get("key")
                if table in rows and isinstance(key, str):
                    rows[table].setdefault(key, row)
        self._rows = rows

    def keys(self, table: str) -> set[str]:
        return set(self._table(table))

    def has(self, table: str, key: str) -> bool:
        return key in self._table(table)

    def get(self, table: str, key: str) -> dict | None:
        return self._table(table).get(key)

    def rows(self, table: str) -> list[dict]:
        return list(self._table(table).values())

    def add(self, table: str, key: str, row: dict[str, Any]) -> bool:
        """Append ``row`` under ``key``; returns False (and writes nothing) if the key is already stored."""
        rows = self._table(table)
        if key in rows:
            return False
        record = {"table": table, "key": key, **row}
        line = json.dumps(record, default=_jsonable) + "\n"
        if not self.persist:
            rows[key] = json.loads(line)
            return True
        path = self.shard_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            if f.tell() > 0 and not _ends_with_newline(path):
                f.write(b"\n")  # terminate a torn line left by a killed writer
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        rows[key] = json.loads(line)
        return True

    def frame(self, table: str):
        """The rows of ``table`` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows(table))

    def _table(self, table: str) -> dict[str, dict]:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {TABLES}")
        return self._rows[table]

    # --------------------------------------------------------------- outputs
    def output_path(self, key: str) -> Path:
        return self.root / "outputs" / key[:2] / f"{key}.pt"

    def has_output(self, key: str) -> bool:
        return key in self._memory_outputs or self.output_path(key).is_file()

    def save_output(self, key: str, record: dict[str, Any], media: str | None = None) -> Path:
        """Save a generation record (``{"output": tensor, ...}``) atomically: a temporary file renamed into
        place, so an output that exists is complete. ``media``: ``"image"`` (``[N, C, H, W]`` in [0, 1]) or
        ``"video"`` (``[B, F, C, H, W]``) also writes the viewable file (:meth:`media_path`) first."""
        path = self.output_path(key)
        if not self.persist:
            self._memory_outputs[key] = record
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if media in ("image", "video"):
            save_media(record["output"], path.with_suffix(""), media)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(record, tmp)
        os.replace(tmp, path)
        return path

    def media_path(self, key: str) -> Path | None:
        """The viewable file of an output (``.png``, ``.mp4`` or ``.gif``), None when there is none."""
        stem = self.output_path(key).with_suffix("")
        return next((p for p in (stem.with_suffix(s) for s in (".png", ".mp4", ".gif")) if p.is_file()), None)

    def load_output(self, key: str) -> dict[str, Any]:
        if key in self._memory_outputs:
            return self._memory_outputs[key]
        return torch.load(self.output_path(key), map_location="cpu", weights_only=True)


def save_media(output: torch.Tensor, stem: Path, kind: str) -> Path:
    """Write ``output`` viewably at ``stem`` + suffix: images ``[N, C, H, W]`` in [0, 1] side by side as PNG;
    videos ``[B, F, C, H, W]`` (clips side by side) as MP4 (imageio + imageio-ffmpeg, when installed) or GIF
    (PIL, 8 frames per second). Written to a temporary name and renamed, like the records."""
    import importlib.util

    import numpy as np
    from PIL import Image

    x = output.detach().float().cpu().clamp(0, 1)
    if kind == "image":
        frames = [x[None] if x.dim() == 3 else x]  # one frame: the images side by side
    else:
        x = x if x.dim() == 5 else x[None]
        frames = [x[:, f] for f in range(x.shape[1])]
    arrays = []
    for frame in frames:  # [N, C, H, W] -> H x (N * W) x 3
        row = torch.cat(list(frame), dim=-1)
        row = row.expand(3, -1, -1) if row.shape[0] == 1 else row[:3]
        arrays.append((row.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    if kind == "image":
        path = stem.with_suffix(".png")
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
        Image.fromarray(arrays[0]).save(tmp)
    elif importlib.util.find_spec("imageio") is not None and importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio.v2 as imageio

        path = stem.with_suffix(".mp4")
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.mp4")
        even = [np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge") for a in arrays]
        imageio.mimwrite(tmp, even, fps=8, macro_block_size=1)
    else:
        path = stem.with_suffix(".gif")
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.gif")
        images = [Image.fromarray(a) for a in arrays]
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=125, loop=0)
    os.replace(tmp, path)
    return path


def _read_lines(path: Path) -> Iterable[dict]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn last line of a killed writer
            try:
                row = json.loads(raw)
            except ValueError:
                continue  # a torn line that a later append terminated
            if isinstance(row, dict):
                yield row


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a results row")
