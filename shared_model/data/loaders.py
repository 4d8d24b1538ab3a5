"""Loaders for the caption formats data sites hold: COCO, Karpathy splits, CSV/JSONL tables.

Every loader returns a `CaptionSet` of records, a record being one image with all of its
captions (FedCap's unit of privacy). Images are decoded into memory as uint8 RGB of
`image_size` x `image_size` (shorter side resized, then centre-cropped).

Bad input never yields a silently wrong dataset. By default the first bad record raises
`CaptionDataError`, whose message names the file and the record. With `skip_bad=True` bad
records are left out whole and listed in `CaptionSet.skipped`; file-level problems (missing,
non-UTF-8 or invalid file, wrong top-level schema) and an empty result still raise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .formats import FORMATS
from .records import CaptionSet, SkippedRecord
from .vocab import tokenize

KARPATHY_SPLITS = ("train", "val", "test")  # "train" includes "restval" (Karpathy convention)
IMAGE_COLUMNS = ("image", "image_path", "file_name")  # accepted names of a table's image column
_TABLE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".jsonlines": "jsonl"}
_MIN_IMAGE_SIZE = 8


class CaptionDataError(ValueError):
    """A caption data file, or a record in it, is unusable; the message names both."""


class _BadRecord(Exception):
    """A problem with one record, raised while parsing or loading it."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclass
class _Record:
    """One image and its captions, parsed but not yet loaded."""

    image_id: str
    where: str  # names the record in messages, e.g. "image 42 (a.jpg)"
    image_path: Path | None = None
    captions: list[str] = field(default_factory=list)
    problem: _BadRecord | None = None  # first problem found while parsing

    @classmethod
    def failed(cls, bad: _BadRecord) -> "_Record":
        return cls(bad.where, bad.where, problem=bad)

    @property
    def decodable(self) -> bool:
        """Parsed without a problem: its image is worth decoding (it may still be a duplicate id)."""
        return self.problem is None and bool(self.captions)


@dataclass
class ParsedRecords:
    """A caption file parsed, no image decoded yet: decoded in memory by the loaders (`_collect`),
    or on disk in parallel by a site's data store (shared_model/data/store.py)."""

    records: list[_Record]
    path: Path  # the caption file
    label: str  # names it in messages, e.g. "coco annotations <path>"

    def image_paths(self) -> list[Path | None]:
        return [rec.image_path if rec.decodable else None for rec in self.records]


@dataclass
class Selected:
    """The usable records of a `ParsedRecords`, in order: `indices` into its records."""

    indices: list[int]
    captions: list[tuple[str, ...]]
    image_ids: list[str]
    digests: list[str]
    skipped: list[SkippedRecord]


# Public loaders


def load_coco_captions(annotations: str | Path, image_dir: str | Path, *, image_size: int = 64,
                       skip_bad: bool = False) -> CaptionSet:
    """COCO captions JSON: `images` [{id, file_name}], `annotations` [{image_id, caption}]."""
    _check_image_size(image_size)
    return _collect(_parse_coco(annotations, image_dir), image_size=image_size, skip_bad=skip_bad)


def _parse_coco(annotations: str | Path, image_dir: str | Path) -> ParsedRecords:
    path, image_dir = Path(annotations), _existing_dir(image_dir)
    label = f"coco annotations {path}"
    data = _read_json(path, "coco annotations")
    records: dict[str, _Record] = {}
    out: list[_Record] = []
    for i, entry in enumerate(_top_level_list(data, "images", label)):
        try:
            image_id = str(_get(entry, "id", (int, str), f"images[{i}]"))
        except _BadRecord as bad:
            out.append(_Record.failed(bad))
            continue
        rec = _Record(image_id, f"image {image_id}")
        try:
            file_name = _get(entry, "file_name", str, rec.where)
            rec.where, rec.image_path = f"image {image_id} ({file_name})", image_dir / file_name
        except _BadRecord as bad:
            rec.problem = bad
        if image_id in records:  # the captions go to the first; this entry is the duplicate
            rec.problem = _BadRecord(f"images[{i}] (id {image_id})", "duplicate image id")
        records.setdefault(image_id, rec)
        out.append(rec)
    for k, ann in enumerate(_top_level_list(data, "annotations", label)):
        try:
            image_id = str(_get(ann, "image_id", (int, str), f"annotation {k}"))
            where = f"annotation {k} (image_id {image_id})"
            if image_id not in records:
                raise _BadRecord(where, "unknown image id")
        except _BadRecord as bad:
            out.append(_Record.failed(bad))
            continue
        rec = records[image_id]
        try:
            rec.captions.append(_caption(ann, "caption", where))
        except _BadRecord as bad:
            rec.problem = rec.problem or bad
    return ParsedRecords(out, path, label)


def load_karpathy(path: str | Path, image_dir: str | Path, *, split: str = "train", image_size: int = 64,
                  skip_bad: bool = False) -> CaptionSet:
    """Karpathy split JSON (dataset_coco.json style); image ids are `cocoid`, else `imgid`."""
    _check_image_size(image_size)
    return _collect(_parse_karpathy(path, image_dir, split=split), image_size=image_size, skip_bad=skip_bad)


def _parse_karpathy(path: str | Path, image_dir: str | Path, *, split: str) -> ParsedRecords:
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    path, image_dir = Path(path), _existing_dir(image_dir)
    label = f"karpathy split {path}"
    wanted = {"train", "restval"} if split == "train" else {split}
    out: list[_Record] = []
    for i, entry in enumerate(_top_level_list(_read_json(path, "karpathy split"), "images", label)):
        try:
            where = f"images[{i}]"
            entry_split = _get(entry, "split", str, where)
            if entry_split not in (*KARPATHY_SPLITS, "restval"):
                raise _BadRecord(where, f"unknown split {entry_split!r}")
            if entry_split not in wanted:
                continue
            image_id = str(_get(entry, "cocoid" if "cocoid" in entry else "imgid", (int, str), where))
            filename = _get(entry, "filename", str, where)
            where = f"image {image_id} ({filename})"
            folder = _get(entry, "filepath", str, where) if "filepath" in entry else ""
            sentences = _get(entry, "sentences", list, where)
            captions = [_caption(s, "raw", f"{where} sentence {k}") for k, s in enumerate(sentences)]
            out.append(_Record(image_id, where, image_dir / folder / filename, captions))
        except _BadRecord as bad:
            out.append(_Record.failed(bad))
    return ParsedRecords(out, path, label)


def load_caption_table(path: str | Path, *, image_root: str | Path | None = None, image_size: int = 64,
                       skip_bad: bool = False) -> CaptionSet:
    """CSV or JSONL table (chosen by suffix) of (image, caption) rows; rows sharing an image form one record."""
    path = Path(path)
    kind = _TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"caption table must end in one of {sorted(_TABLE_SUFFIXES)}, got {path.name!r}")
    _check_image_size(image_size)
    return _collect(_parse_table(path, kind, image_root=image_root), image_size=image_size, skip_bad=skip_bad)


def load_dataset(fmt: str, path: str | Path, *, image_dir: str | Path | None = None, split: str = "train",
                 image_size: int = 64, skip_bad: bool = False) -> CaptionSet:
    """Load `path` in format `fmt` (one of FORMATS); `split` applies to karpathy only."""
    _check_image_size(image_size)
    return _collect(parse_dataset(fmt, path, image_dir=image_dir, split=split), image_size=image_size,
                    skip_bad=skip_bad)


def parse_dataset(fmt: str, path: str | Path, *, image_dir: str | Path | None = None, split: str = "train"
                  ) -> ParsedRecords:
    """`load_dataset` without decoding an image: the parsed records, for a decoder of one's own."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if fmt in ("csv", "jsonl"):
        return _parse_table(Path(path), fmt, image_root=image_dir)
    if image_dir is None:
        raise ValueError(f"image_dir is required for format {fmt!r}")
    if fmt == "coco":
        return _parse_coco(path, image_dir)
    return _parse_karpathy(path, image_dir, split=split)


FOLDER_FILES = {"coco": "captions.json", "karpathy": "dataset.json", "csv": "captions.csv", "jsonl": "captions.jsonl"}


def load_dataset_folder(fmt: str, root: str | Path, *, split: str = "train", image_size: int = 64,
                        skip_bad: bool = False) -> CaptionSet:
    """A dataset folder: coco (captions.json + images/), karpathy (dataset.json + images/), csv
    (captions.csv) or jsonl (captions.jsonl), image paths relative to the folder."""
    _check_image_size(image_size)
    return _collect(parse_dataset_folder(fmt, root, split=split), image_size=image_size, skip_bad=skip_bad)


def parse_dataset_folder(fmt: str, root: str | Path, *, split: str = "train") -> ParsedRecords:
    """`load_dataset_folder` without decoding an image."""
    if fmt not in FOLDER_FILES:
        raise ValueError(f"dataset format must be one of {tuple(FOLDER_FILES)}, got {fmt!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    return parse_dataset(fmt, root / FOLDER_FILES[fmt], image_dir=root / "images" if fmt in ("coco", "karpathy") else root,
                         split=split)


def load_images(paths: Iterable[str | Path], *, image_size: int = 64) -> np.ndarray:
    """uint8 [N, image_size, image_size, 3] RGB from image files, e.g. new images to caption."""
    _check_image_size(image_size)
    try:
        images = [load_image(Path(p), image_size, str(p))[0] for p in paths]
    except _BadRecord as bad:
        raise CaptionDataError(bad.reason) from None
    if not images:
        raise ValueError("no image paths given")
    return np.stack(images)


# Tables


def _parse_table(path: Path, kind: str, *, image_root: str | Path | None) -> ParsedRecords:
    label = f"caption table {path}"
    root = path.parent if image_root is None else _existing_dir(image_root)
    text = _read_text(path, "caption table")
    rows = _csv_rows(text, label) if kind == "csv" else _jsonl_rows(text)
    records: dict[Path, _Record] = {}
    out: list[_Record] = []
    for where, row in rows:
        try:
            if isinstance(row, _BadRecord):
                raise row
            key = next((k for k in IMAGE_COLUMNS if isinstance(row, dict) and k in row), IMAGE_COLUMNS[0])
            image = _get(row, key, str, where)
            if not image.strip():
                raise _BadRecord(where, f"empty {key!r}")
        except _BadRecord as bad:
            out.append(_Record.failed(bad))
            continue
        image_path = root / image
        rec = records.get(image_path)
        if rec is None:
            rec = records[image_path] = _Record(image, f"image {image!r}", image_path)
            out.append(rec)
        try:
            rec.captions.append(_caption(row, "caption", f"{where} (image {image!r})"))
        except _BadRecord as bad:
            rec.problem = rec.problem or bad
    return ParsedRecords(out, path, label)


def _csv_rows(text: str, label: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if "caption" not in columns or not any(c in columns for c in IMAGE_COLUMNS):
        raise CaptionDataError(f"{label}: header must have a 'caption' column and one of {IMAGE_COLUMNS}, "
                               f"got {columns}")
    return [(f"line {reader.line_num}", row) for row in reader]


def _jsonl_rows(text: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"line {n}", _BadRecord(f"line {n}", f"invalid JSON: {e}")))
    return rows


# Shared helpers


def _collect(parsed: ParsedRecords, *, image_size: int, skip_bad: bool) -> CaptionSet:
    """Decode the images of parsed records into memory; raise on, or skip, bad ones."""
    images: list[np.ndarray] = []

    def load(k: int, rec: _Record) -> str:
        image, digest = load_image(rec.image_path, image_size, rec.where)
        images.append(image)
        return digest

    kept = select_records(parsed, skip_bad=skip_bad, load=load)
    return CaptionSet(images=np.stack(images), captions=kept.captions, image_ids=kept.image_ids,
                      skipped=kept.skipped, source_digests=kept.digests)


def select_records(parsed: ParsedRecords, *, skip_bad: bool, load: Callable[[int, _Record], str]) -> Selected:
    """The usable records in file order. `load(k, record)` is called for each record that passed
    every other check, in order, and returns its image's digest or raises `_BadRecord` (the one
    policy for both decoders: the first bad record raises CaptionDataError naming the file and
    the record, or with `skip_bad` is listed and left out; no usable record raises)."""
    out = Selected([], [], [], [], [])
    seen: set[str] = set()
    for k, rec in enumerate(parsed.records):
        try:
            if rec.problem is not None:
                raise rec.problem
            if not rec.captions:
                raise _BadRecord(rec.where, "no captions")
            if rec.image_id in seen:
                raise _BadRecord(rec.where, "duplicate image id")
            digest = load(k, rec)
        except _BadRecord as bad:
            if not skip_bad:
                raise CaptionDataError(f"{parsed.label}: {bad.where}: {bad.reason}") from None
            out.skipped.append(SkippedRecord(str(parsed.path), bad.where, bad.reason))
            continue
        out.indices.append(k)
        out.captions.append(tuple(rec.captions))
        out.image_ids.append(rec.image_id)
        out.digests.append(digest)
        seen.add(rec.image_id)
    if not out.indices:
        first = f"; first: {out.skipped[0].record}: {out.skipped[0].reason}" if out.skipped else ""
        raise CaptionDataError(f"{parsed.label}: no usable records ({len(out.skipped)} bad{first})")
    return out


def load_image(path: Path | None, size: int, where: str) -> tuple[np.ndarray, str]:
    """(uint8 [size, size, 3] RGB: shorter side resized to `size`, then centre-cropped; SHA-256 of
    the file's bytes, the record's identity whatever `size` is)."""
    if path is None or not path.is_file():
        raise _BadRecord(where, f"image file not found: {path}")
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im = ImageOps.fit(im.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise _BadRecord(where, f"unreadable image {path}: {why}") from None
    return np.asarray(im, dtype=np.uint8), hashlib.sha256(raw).hexdigest()


def _get(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """entry[key], checked to be a dict entry of type `kind`."""
    if not isinstance(entry, dict):
        raise _BadRecord(where, f"expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise _BadRecord(where, f"missing key {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise _BadRecord(where, f"{key!r} must be {names}, got {type(value).__name__}")
    return value


def _caption(entry: Any, key: str, where: str) -> str:
    text = _get(entry, key, str, where)
    if not tokenize(text):
        raise _BadRecord(where, f"empty caption {text!r}")
    return text


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")


def _existing_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image directory not found: {path}")
    return path


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `what` (e.g. "coco annotations") at `path`."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionDataError(f"{what} {path}: not UTF-8 text ({e})") from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as e:
        raise CaptionDataError(f"{what} {path}: invalid JSON ({e})") from None


def _top_level_list(data: Any, key: str, label: str) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise CaptionDataError(f"{label}: expected a JSON object with a list {key!r}")
    return data[key]
