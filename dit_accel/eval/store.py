"""The results store: a folder of append-only JSON-lines files plus the generated outputs.

Layout of ``STORE/``::

    rows/<host>-<pid>-r<rank>.jsonl   one file per writing process: {"table": ..., "key": ..., ...} per line
    outputs/<kk>/<key>.pt             one generation record ({"output": tensor, "stats", "seconds"}) per key

Every row has a ``key`` (a hash of everything that determines it) and belongs to a ``table``
(``sample`` — one generated sample and its metrics — or ``config`` — one configuration's timing and
aggregate metrics). A row is written only once its work is finished, as a single line flushed and
fsynced, so a killed run loses at most the row being computed; a torn last line is skipped on read and
terminated before the next append. Each process appends to its own file, so processes of a
multi-GPU or multi-node run never write to the same file; reading takes the union of all files and keeps
the first row of each key, so nothing is duplicated when a run is resumed.
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
    """Read and append rows; save and load generated outputs. ``rank`` names this process's shard file."""

    def __init__(self, root: str | os.PathLike, rank: int = 0) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"results store {str(self.root)!r} exists and is not a folder")
        self.rank = rank
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
        return self.output_path(key).is_file()

    def save_output(self, key: str, record: dict[str, Any]) -> Path:
        """Save a generation record (``{"output": tensor, ...}``) atomically: a temporary file renamed into
        place, so an output that exists is complete."""
        path = self.output_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(record, tmp)
        os.replace(tmp, path)
        return path

    def load_output(self, key: str) -> dict[str, Any]:
        return torch.load(self.output_path(key), map_location="cpu", weights_only=True)


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
