"""Where calibration documents come from: the shipped data, a local file, or a hub dataset.

A Source yields documents (a string, or a list of chat messages when chat_template is on) in a
seeded order, lazily, and names itself for the cache key without reading its data: a local
file by path, size and modification time; a hub dataset by its revision.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import CalibrationError
from quantkit.paths import calib_data_dir

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SHUFFLE_BUFFER = 10_000  # hub streaming: documents held for the seeded shuffle (datasets' default 1000)


@dataclass
class Source:
    name: str
    column: str
    chat_template: bool

    def fingerprint(self) -> list:
        raise NotImplementedError

    def documents(self, seed: int | None) -> Iterator[Any]:
        """Documents in a seeded order (seed None: file order)."""
        raise NotImplementedError

    def _value(self, row: dict, where: str) -> Any:
        if self.column not in row:
            raise CalibrationError(f"{where}: no column {self.column!r}; columns: {', '.join(map(str, row)) or 'none'}")
        value = row[self.column]
        if self.chat_template:
            if not (isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)):
                raise CalibrationError(f"{where}: column {self.column!r} is not a list of chat messages "
                                       "({role, content} objects), which calib.chat_template needs")
        elif not isinstance(value, str):
            raise CalibrationError(f"{where}: column {self.column!r} is not text")
        return value


@dataclass
class LocalSource(Source):
    path: Path

    def fingerprint(self) -> list:
        st = self.path.stat()  # no read of the bytes: an edit changes size or mtime
        return ["file", str(self.path.resolve()), st.st_size, st.st_mtime_ns, self.column, self.chat_template]

    def documents(self, seed: int | None) -> Iterator[Any]:
        rows = self._rows()
        order = list(range(len(rows)))
        if seed is not None:
            random.Random(seed).shuffle(order)
        for i in order:
            yield rows[i]

    def _rows(self) -> list[Any]:
        """Every document of the file; reading a local file is cheap, tokenizing it is not."""
        p, suffix = self.path, self.path.suffix
        if suffix == ".txt":
            if self.chat_template:
                raise CalibrationError(f"{p}: calib.chat_template needs a messages column (jsonl/json/parquet)")
            # documents are paragraphs (blank-line separated)
            return [d for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        if suffix == ".jsonl":
            return [self._value(row, f"{p}:{i}") for i, row in self._jsonl(p)]
        if suffix == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return [self._value(row, f"{p}:{i}") for i, row in self._jsonl(p)]  # JSON lines named .json
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise CalibrationError(f"{p}: expected a JSON list of objects (or JSON lines)")
            return [self._value(row, f"{p}[{i}]") for i, row in enumerate(data)]
        if suffix == ".csv":
            with open(p, encoding="utf-8", newline="") as f:
                return [self._value(row, f"{p}:{i + 2}") for i, row in enumerate(csv.DictReader(f))]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(p).names
            if self.column not in names:
                raise CalibrationError(f"{p}: no column {self.column!r}; columns: {', '.join(names)}")
            values = pq.read_table(p, columns=[self.column]).column(self.column).to_pylist()
            return [self._value({self.column: v}, f"{p} row {i}") for i, v in enumerate(values) if v]
        raise CalibrationError(f"{p}: unsupported calibration file type; use one of {', '.join(LOCAL_SUFFIXES)}")

    @staticmethod
    def _jsonl(p: Path) -> Iterator[tuple[int, dict]]:
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{p}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise CalibrationError(f"{p}:{i}: expected a JSON object")
                yield i, row


@dataclass
class HubSource(Source):
    subset: str | None
    split: str
    revision: str | None

    def fingerprint(self) -> list:
        local = Path(self.name).expanduser()
        if local.is_dir():  # a dataset folder on disk: its files' stats stand for the revision
            revision: Any = [(str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns)
                             for f in sorted(local.rglob("*")) if f.is_file()]
        else:
            revision = self._resolved_revision()
        return ["hub", self.name, self.subset, self.split, revision, self.column, self.chat_template]

    def _resolved_revision(self) -> str:
        """The commit the cache holds for the requested revision, without downloading anything."""
        rev = self.revision or "main"
        if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
            return rev
        try:
            from huggingface_hub.constants import HF_HUB_CACHE

            ref = Path(HF_HUB_CACHE) / f"datasets--{self.name.replace('/', '--')}" / "refs" / rev
            if ref.is_file():
                return ref.read_text().strip()
            if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
                from huggingface_hub import HfApi

                return HfApi().dataset_info(self.name, revision=rev).sha or rev
        except Exception:  # no network or no such repo: loading the data reports that in one line
            pass
        return rev

    def documents(self, seed: int | None) -> Iterator[Any]:
        ds = self._open()
        if seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER) if _is_iterable(ds) else ds.shuffle(seed=seed)
        for i, row in enumerate(ds):
            yield self._value(row, f"dataset {self.name!r} ({self.split})")

    def _open(self):
        import datasets

        kw = {"split": self.split, "revision": self.revision}
        errors = []
        # streaming reads only the shards the documents come from; a dataset already in the local
        # cache (offline) opens without it
        for streaming in (True, False):
            try:
                return datasets.load_dataset(self.name, self.subset, streaming=streaming, **kw)
            except Exception as e:  # datasets raises many types for offline / missing / gated
                errors.append(str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
        raise CalibrationError(f"dataset {self.name!r} could not be loaded (not cached and offline?): {errors[-1]}")


def _is_iterable(ds) -> bool:
    import datasets

    return isinstance(ds, datasets.IterableDataset)


def open_source(
    source: str,
    *,
    split: str | None = None,
    column: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    chat_template: bool = False,
    held_out: bool = False,
) -> Source:
    """A Source for a recipe's `calib.source` (held_out: the shipped evaluation split)."""
    column = column or ("messages" if chat_template else "text")
    if source == "default":
        path = calib_data_dir() / ("wiki_eval.jsonl" if held_out else "wiki_calib.jsonl")
        if not path.exists():
            raise CalibrationError(f"shipped data {path} is missing; run python calib_data/build.py")
        return LocalSource(name="default", column="text", chat_template=False, path=path)
    path = Path(source).expanduser()
    if path.is_file():
        return LocalSource(name=source, column=column, chat_template=chat_template, path=path)
    if not path.is_dir() and (source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES)):
        raise CalibrationError(f"calibration file {source} does not exist")
    # a hub dataset name, or a dataset folder on disk: both open with datasets.load_dataset
    return HubSource(name=source, column=column, chat_template=chat_template, subset=subset,
                     split=split or ("test" if held_out else "train"), revision=revision)
