"""Images that stay on disk until a row is asked for: what lets a site train on more photographs
than fit in memory.

`ImageFile` is a uint8 [N, H, W, 3] array in NumPy's `.npy` format (header, then C-order rows),
read with `os.preadv` into a fresh buffer: nothing is memory-mapped, so a read costs the row's
bytes in the kernel's page cache (shared, reclaimable) and never grows the process's resident
memory the way touched pages of a mapping do. `ImageRows` is the lazy [N, H, W, 3] view that a
`CaptionSet` holds instead of an in-memory array: which rows of which sources (in-memory arrays
or image files), in order. Taking a subset or appending records composes the row list without
reading a pixel; indexing returns a plain numpy array of the rows asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

_READ_CHUNK = 64  # rows per read while iterating


class ImageFile:
    """The rows of a `.npy` file holding uint8 [N, H, W, 3] (C order); ValueError naming the file
    when it is not one, or is shorter than its header says (a torn or truncated write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except ValueError as e:
                raise ValueError(f"image file {self.path} is not a .npy array: {e}") from None
            self.offset = f.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"image file {self.path} must hold a C-order uint8 [N, H, W, 3] array, got "
                             f"{dtype} {shape}{' (Fortran order)' if fortran else ''}")
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape[1:]))
        expected, size = self.offset + self.shape[0] * self.row_bytes, self.path.stat().st_size
        if size != expected:
            raise ValueError(f"image file {self.path} has {size} bytes where its header ({self.shape}) needs "
                             f"{expected}: truncated or torn")
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), H, W, 3]: the rows asked for, in that order (one read per run of
        consecutive rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row {int(rows.min() if rows.min() < 0 else rows.max())} out of range for "
                             f"{self.shape[0]} rows of {self.path}")
        fd, start = self._descriptor(), 0
        flat = out.reshape(len(rows), self.row_bytes)
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            want = (end - start) * self.row_bytes
            got = os.preadv(fd, [memoryview(flat[start:end]).cast("B")], self.offset + int(rows[start]) * self.row_bytes)
            if got != want:
                raise OSError(f"short read from {self.path}: {got} of {want} bytes at row {int(rows[start])}")
            start = end
        return out

    def __getstate__(self) -> dict:  # pickled (a DataLoader worker, a Ray actor): reopen there
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


Source = Union[np.ndarray, ImageFile]


class ImageRows:
    """A lazy uint8 [N, H, W, 3] array: row k is row `row[k]` of `sources[source[k]]`.

    Supports what the data path needs of an array: `shape`, `dtype`, `ndim`, `len`, iteration,
    `[int]` (one row, [H, W, 3]), `[slice]` and `[int array]` (rows, [n, H, W, 3]), and
    `np.asarray` (every row, read into memory: only for small sets). `take` and `concat` give new
    views without reading."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, sources: Sequence[Source], source: np.ndarray, row: np.ndarray) -> None:
        self.sources = tuple(sources)
        self.source = np.asarray(source, dtype=np.int32)
        self.row = np.asarray(row, dtype=np.int64)
        if not self.sources:
            raise ValueError("ImageRows needs at least one source")
        shapes = {tuple(s.shape[1:]) for s in self.sources}
        if len(shapes) != 1:
            raise ValueError(f"ImageRows sources must share one row shape, got {sorted(shapes)}")
        for s in self.sources:
            if isinstance(s, np.ndarray) and (s.dtype != np.uint8 or s.ndim != 4):
                raise TypeError(f"an in-memory source must be uint8 [N, H, W, 3], got {s.dtype} {s.shape}")
        if self.source.shape != self.row.shape or self.source.ndim != 1:
            raise ValueError(f"source and row must be 1-D of one length, got {self.source.shape} and {self.row.shape}")
        self.shape = (len(self.row), *shapes.pop())

    @classmethod
    def of(cls, source: Source) -> "ImageRows":
        """Every row of one source, in order."""
        n = len(source)
        return cls([source], np.zeros(n, dtype=np.int32), np.arange(n, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence["ImageRows | np.ndarray"]) -> "ImageRows":
        """The rows of `parts`, one after another (in-memory arrays become sources as they are)."""
        sources: list[Source] = []
        source, row = [], []
        for part in parts:
            part = part if isinstance(part, ImageRows) else cls.of(part)
            index = {}
            for k, s in enumerate(part.sources):
                found = next((j for j, t in enumerate(sources) if t is s), None)
                if found is None:
                    sources.append(s)
                    found = len(sources) - 1
                index[k] = found
            source.append(np.array([index[k] for k in range(len(part.sources))], dtype=np.int32)[part.source])
            row.append(part.row)
        return cls(sources, np.concatenate(source), np.concatenate(row))

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, indices: Sequence[int] | np.ndarray) -> "ImageRows":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageRows(self.sources, self.source[idx], self.row[idx])

    def _read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        src, row = self.source[idx], self.row[idx]
        for k, s in enumerate(self.sources):
            mask = src == k
            if mask.any():
                out[mask] = s[row[mask]] if isinstance(s, np.ndarray) else s.read(row[mask])
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if not -len(self) <= k < len(self):
                raise IndexError(f"row {k} out of range for {len(self)} rows")
            return self._read(np.array([k % len(self)]))[0]
        if isinstance(key, slice):
            return self._read(np.arange(len(self))[key])
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return self._read(idx.astype(np.int64))

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self), _READ_CHUNK):
            yield from self[start: start + _READ_CHUNK]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        files = [str(s.path) for s in self.sources if isinstance(s, ImageFile)]
        return f"ImageRows(shape={self.shape}, files={files}, in_memory={len(self.sources) - len(files)})"
