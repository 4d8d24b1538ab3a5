"""A caption gallery: a few images, their reference captions and what a model said about them.

The run summary (server/server_app.py) shows the server's own evaluation images at the first and
the last round (data the server owns, never a site's records); `fedcap caption CHECKPOINT --data DIR
--gallery OUT` writes the same table for one checkpoint (`write_gallery`). The images are written
as PNG files (upscaled, nearest neighbour) in a folder beside the Markdown that links them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

GALLERY_SIZE = 6


class Gallery:
    def __init__(self, eval_set, folder: Path, size: int = GALLERY_SIZE) -> None:
        self.ids = list(eval_set.image_ids[:size])
        self.images = {i: eval_set.images[k] for k, i in enumerate(self.ids)}
        self.references = {i: list(eval_set.captions[k]) for k, i in enumerate(self.ids)}
        self.folder = folder
        self.first: tuple[int, dict[str, str]] | None = None
        self.last: tuple[int, dict[str, str]] | None = None

    def observe(self, server_round: int | str, predictions: dict[str, Any]) -> None:
        """Captions after `server_round` (or any column label); the first and the last are shown."""
        shown = {i: str(predictions.get(i, "")) for i in self.ids}
        if self.first is None:
            self.first = (server_round, shown)
        self.last = (server_round, shown)

    def section(self, title: str = "What the model says (the server's evaluation images)") -> list[str]:
        """Markdown lines (and the PNG files they link); [] before any evaluation."""
        if self.first is None or not self.ids:
            return []
        from PIL import Image

        self.folder.mkdir(parents=True, exist_ok=True)
        (r0, first), (r1, last) = self.first, self.last
        columns = [(r0, first)] if r0 == r1 else [(r0, first), (r1, last)]
        lines = ["", f"## {title}", "", "| image | references | "
                 + " | ".join(f"round {r}" if isinstance(r, int) else _cell(r) for r, _ in columns) + " |",
                 "|---|---|" + "---|" * len(columns)]
        for k, image_id in enumerate(self.ids):
            name = f"{k:02d}.png"
            image = Image.fromarray(np.ascontiguousarray(self.images[image_id]))
            image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(self.folder / name)
            refs = "<br>".join(_cell(c) for c in self.references[image_id])  # every reference
            lines.append(f"| ![{_cell(image_id)}]({self.folder.name}/{name}) | {refs} | "
                         + " | ".join(_cell(shown[image_id]) for _, shown in columns) + " |")
        return lines


def write_gallery(model, data, vocab, out_dir: str | Path, *, label: str, size: int = GALLERY_SIZE,
                  beam_size: int = 1, device="cpu") -> Path:
    """<out_dir>/gallery.md and <out_dir>/images/*.png: the first `size` records of `data` with
    their references and `model`'s captions (column `label`, e.g. the checkpoint's folder)."""
    from .evaluator import decoding, generate_captions

    if size < 1:
        raise ValueError(f"gallery size must be >= 1, got {size}")
    out = Path(out_dir)
    shown = data.subset(range(min(size, len(data))))
    gallery = Gallery(shown, out / "images", size=size)
    gallery.observe(label, generate_captions(model.to(device), shown, vocab, beam_size=beam_size, device=device))
    path = out / "gallery.md"
    title = f"What the model says: {label}, {decoding(beam_size)}"
    path.write_text("\n".join(gallery.section(title=title)[1:]) + "\n", encoding="utf-8")
    return path


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")
