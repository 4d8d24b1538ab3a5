"""A caption gallery for the run summary: a few of the server's own evaluation images, their
reference captions and what the global model said about them at the first and the last round.

Only the server's evaluation set is shown (data the server owns), never a site's records. The
images are written as PNG files (upscaled, nearest neighbour) beside summary.md and linked from it.
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

    def observe(self, server_round: int, predictions: dict[str, Any]) -> None:
        shown = {i: str(predictions.get(i, "")) for i in self.ids}
        if self.first is None:
            self.first = (server_round, shown)
        self.last = (server_round, shown)

    def section(self) -> list[str]:
        """Markdown lines (and the PNG files they link); [] before any evaluation."""
        if self.first is None or not self.ids:
            return []
        from PIL import Image

        self.folder.mkdir(parents=True, exist_ok=True)
        (r0, first), (r1, last) = self.first, self.last
        lines = ["", "## What the model says (the server's evaluation images)", "",
                 f"| image | references | round {r0} | round {r1} |", "|---|---|---|---|"]
        for k, image_id in enumerate(self.ids):
            name = f"{k:02d}.png"
            image = Image.fromarray(np.ascontiguousarray(self.images[image_id]))
            image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(self.folder / name)
            refs = "<br>".join(_cell(c) for c in self.references[image_id][:2])
            lines.append(f"| ![{_cell(image_id)}]({self.folder.name}/{name}) | {refs} | {_cell(first[image_id])} | "
                         f"{_cell(last[image_id])} |")
        return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")
