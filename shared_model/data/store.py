"""A site's records decoded once into a store on its own disk, which training reads row by row.

A site's photographs do not fit in memory at scale (118k COCO images at 224 px are a 17 GB uint8
array), so a deployed site decodes its folder once into two files and from then on holds only
the captions and content IDs in memory; the pixels are read per training example
(`rows.ImageFile`, `rows.ImageRows`). client/data_cache.py chooses the folder (the site's cache
dir, never sent anywhere) and the key (the loader settings and every file's path, size and mtime).

Files of one store `<stem>`:
  <stem>.npy   the images, uint8 [N, S, S, 3], NumPy's .npy format (created by
               numpy.lib.format.open_memmap; rows written in place with pwrite by the decoding
               processes; read back with os.preadv, never loaded whole and never mapped)
  <stem>.json  "fedcap-store/1": image size, record count, the .npy's byte size, and per record
               its image id, captions and source digest (SHA-256 of the image file: the input of
               the record's content ID), plus the records the loader skipped
Both are written under temporary names, fsynced and renamed, the .npy first: the .json is the
commit mark, so an interrupted build leaves no store and the next start builds it again.
`open_store` checks the .json, the .npy's header and the .npy's size against each other and
raises `StoreError` naming the file (the cache then rebuilds it, with a warning). It does not hash
the pixels at every start (that would cost a full read, what the store is there to save): a bit
flipped inside the .npy goes unnoticed, as it would in the image folder itself.

The first decode runs in `workers` processes (default: every core this process may use), each
decoding a chunk of images with the loaders' own `load_image` and writing its rows in place; a
progress line every few seconds. The record selection (bad, skipped and duplicate records) is
the loaders' own `select_records`, and the digests come from the same function as in memory, so
`CaptionSet.record_ids()` of a store is exactly that of a fresh in-memory load, record for record.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np

from shared_model.util import atomic_replace, atomic_write

from .checks import check_int
from .loaders import ParsedRecords, _BadRecord, _check_image_size, load_image, select_records
from .records import CaptionSet, SkippedRecord
from .rows import ImageFile, ImageRows

STORE_FORMAT = "fedcap-store/1"
CHUNK = 32  # images per task of a decoding process, at most
REPORT_EVERY = 5.0  # seconds between progress lines


class StoreError(ValueError):
    """A store that cannot be used as it is (torn, truncated, inconsistent); the message names the file."""


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def store_paths(stem: str | Path) -> tuple[Path, Path]:
    """(<stem>.npy, <stem>.json)."""
    return Path(f"{stem}.npy"), Path(f"{stem}.json")


def open_store(stem: str | Path) -> CaptionSet:
    """The records of a built store, images left on disk; StoreError naming the file when the store
    is not whole, FileNotFoundError when there is none."""
    npy, meta_path = store_paths(stem)
    if not meta_path.is_file():
        raise FileNotFoundError(f"no data store at {meta_path}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"data store {meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise StoreError(f"data store {meta_path} is not a {STORE_FORMAT} file")
    if not npy.is_file():
        raise StoreError(f"data store {meta_path} has no image file {npy}")
    try:
        images = ImageFile(npy)
    except ValueError as e:
        raise StoreError(str(e)) from None
    count, size = meta.get("count"), meta.get("image_size")
    if images.shape != (count, size, size, 3) or npy.stat().st_size != meta.get("npy_bytes"):
        raise StoreError(f"data store {npy} holds {images.shape} in {npy.stat().st_size} bytes where {meta_path} "
                         f"says {count} images of {size} px in {meta.get('npy_bytes')} bytes")
    try:
        return CaptionSet(images=ImageRows.of(images), captions=[tuple(c) for c in meta["captions"]],
                          image_ids=list(meta["image_ids"]), source_digests=meta["source_digests"],
                          skipped=[SkippedRecord(*s) for s in meta["skipped"]])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"data store {meta_path} has unusable records: {type(e).__name__}: {e}") from None


def write_store(stem: str | Path, data: CaptionSet) -> CaptionSet:
    """Write an in-memory `data` (with source digests, or without) as a store; returns it opened."""
    npy, _ = store_paths(stem)
    tmp = _temp_path(npy)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(data.images.shape))
        for start in range(0, len(data), 256):
            array[start: start + 256] = data.images[start: start + 256]
        array.flush()
        del array
        _commit(stem, tmp, image_size=int(data.images.shape[1]), captions=data.captions, image_ids=data.image_ids,
                digests=data.source_digests, skipped=data.skipped)
    finally:
        tmp.unlink(missing_ok=True)
    return open_store(stem)


def build_store(parsed: ParsedRecords, stem: str | Path, *, image_size: int, skip_bad: bool = False,
                workers: int | None = None, report: Callable[[str], None] | None = None) -> CaptionSet:
    """Decode the images of `parsed` (a loader's parsed caption file) at `image_size` into the store
    `<stem>` with `workers` processes (None: `available_cores()`), and return it opened. Bad
    records raise CaptionDataError or are skipped (`skip_bad`) exactly as the loaders do;
    `report` gets a progress line every few seconds and at the end."""
    _check_image_size(image_size)
    workers = available_cores() if workers is None else check_int("workers", workers, 1)
    npy, _ = store_paths(stem)
    npy.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(npy)
    paths = parsed.image_paths()
    slots = [k for k, p in enumerate(paths) if p is not None]  # record index -> its row in the decoded file
    row_of = {k: j for j, k in enumerate(slots)}
    tmp = _temp_path(npy)
    results: dict[int, str | tuple[str, str]] = {}
    try:
        if slots:
            results = _decode(parsed, paths, slots, tmp, image_size=image_size, workers=workers, report=report)

        def load(k: int, rec) -> str:
            result = results[k]
            if isinstance(result, tuple):
                raise _BadRecord(*result)
            return result

        kept = select_records(parsed, skip_bad=skip_bad, load=load)
        rows = [row_of[k] for k in kept.indices]
        if rows != list(range(len(slots))):  # records left out: copy the kept rows into a file of their own
            tmp = _compact(tmp, rows, image_size=image_size)
        _commit(stem, tmp, image_size=image_size, captions=kept.captions, image_ids=kept.image_ids,
                digests=kept.digests, skipped=kept.skipped)
    finally:
        for path in npy.parent.glob(f".{npy.name}.{os.getpid()}.*"):
            path.unlink(missing_ok=True)
    return open_store(stem)


def _decode(parsed: ParsedRecords, paths: list[Path | None], slots: list[int], tmp: Path, *, image_size: int,
            workers: int, report: Callable[[str], None] | None) -> dict[int, str | tuple[str, str]]:
    """Decode every slot's image into row j of a fresh .npy at `tmp`; record index -> digest, or
    (where, reason) for an image that cannot be read."""
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(slots), image_size, image_size, 3))
    offset = array.offset
    del array  # the file exists at its full size; the decoding processes write into it
    chunk = min(CHUNK, max(1, len(slots) // (4 * workers)))  # small sets still reach every process
    tasks = [[(k, j, str(paths[k]), parsed.records[k].where) for j, k in enumerate(slots[s: s + chunk], start=s)]
             for s in range(0, len(slots), chunk)]
    workers = min(workers, len(tasks))
    results: dict[int, str | tuple[str, str]] = {}
    start, last = time.monotonic(), time.monotonic()

    def progress(final: bool = False) -> None:
        nonlocal last
        if report is not None and (final or time.monotonic() - last >= REPORT_EVERY):
            from shared_model.util import estimate

            elapsed = time.monotonic() - start
            report(f"decoding {parsed.label}: {len(results):,}/{len(slots):,} images at {image_size} px, "
                   f"{workers} process{'es' if workers > 1 else ''}, {len(results) / max(elapsed, 1e-9):.0f}/s "
                   f"({estimate(elapsed, len(results), len(slots))})")
            last = time.monotonic()

    if workers == 1:
        for task in tasks:
            results.update(_decode_chunk(str(tmp), offset, image_size, task))
            progress()
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_decode_chunk, str(tmp), offset, image_size, t) for t in tasks]):
                results.update(future.result())
                progress()
    progress(final=True)
    return results


def _decode_chunk(npy: str, offset: int, image_size: int, items: list[tuple[int, int, str, str]]
                  ) -> dict[int, str | tuple[str, str]]:
    """In a decoding process: each (record index, row, path, where) decoded and written to its row."""
    row_bytes = image_size * image_size * 3
    out: dict[int, str | tuple[str, str]] = {}
    fd = os.open(npy, os.O_WRONLY)
    try:
        for k, row, path, where in items:
            try:
                image, digest = load_image(Path(path), image_size, where)
            except _BadRecord as bad:
                out[k] = (bad.where, bad.reason)
                continue
            data = np.ascontiguousarray(image).tobytes()
            if os.pwrite(fd, data, offset + row * row_bytes) != row_bytes:
                raise OSError(f"short write to {npy} at row {row}")
            out[k] = digest
    finally:
        os.close(fd)
    return out


def _compact(tmp: Path, rows: list[int], *, image_size: int) -> Path:
    """A new temporary .npy holding only `rows` of `tmp`, in that order (records were left out)."""
    source = ImageFile(tmp)
    dest = tmp.with_name(tmp.name + ".kept")
    array = np.lib.format.open_memmap(dest, mode="w+", dtype=np.uint8, shape=(len(rows), image_size, image_size, 3))
    for start in range(0, len(rows), 256):
        array[start: start + 256] = source.read(np.array(rows[start: start + 256]))
    array.flush()
    del array
    tmp.unlink()
    return dest


def _commit(stem: str | Path, tmp: Path, *, image_size: int, captions, image_ids, digests, skipped) -> None:
    """fsync and rename the .npy, then write the .json (the commit mark) atomically."""
    npy, meta_path = store_paths(stem)
    atomic_replace(tmp, npy)
    meta = {"format": STORE_FORMAT, "image_size": image_size, "count": len(image_ids),
            "npy_bytes": npy.stat().st_size, "image_ids": list(image_ids), "captions": [list(c) for c in captions],
            "source_digests": None if digests is None else list(digests),
            "skipped": [[s.source, s.record, s.reason] for s in skipped]}
    atomic_write(meta_path, json.dumps(meta).encode("utf-8"))


def _temp_path(npy: Path) -> Path:
    return npy.with_name(f".{npy.name}.{os.getpid()}.tmp")


def _remove_stale_temps(npy: Path) -> None:
    """Remove the temporary files of builds of this store whose process is gone (a crash)."""
    for path in npy.parent.glob(f".{npy.name}.*"):
        try:
            pid = int(path.name[len(npy.name) + 2:].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue
