"""Give each demo site a data folder in COCO captions format, cut from the embedded synthetic data.

    python -m deploy.site_folders OUT --sites 2 [--train-size 4000] [--partitioner dirichlet]

writes OUT/site-K/captions.json (COCO: `images` [{id, file_name}], `annotations` [{image_id,
caption}]) and OUT/site-K/images/*.png. A real site points its SuperNode's `data-dir` at a folder of
the same shape holding its own records (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from shared_model.data.records import CaptionSet
from shared_model.util import atomic_write


def write_coco_folder(data: CaptionSet, folder: str | Path) -> Path:
    """Write `data` as captions.json + images/<id>.png (PNG is lossless: loading gives the same pixels)."""
    folder = Path(folder)
    if (folder / "captions.json").exists():
        raise FileExistsError(f"{folder / 'captions.json'} exists; choose an empty folder")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k, (image_id, pixels, captions) in enumerate(zip(data.image_ids, data.images, data.captions)):
        name = f"{image_id}.png"
        Image.fromarray(pixels).save(folder / "images" / name)
        images.append({"id": k, "file_name": name})
        annotations += [{"id": len(annotations), "image_id": k, "caption": c} for c in captions]
    atomic_write(folder / "captions.json", json.dumps({"images": images, "annotations": annotations}).encode("utf-8"))
    return folder


def export_sites(out: str | Path, num_sites: int, *, train_size: int = 4000, partitioner: str = "dirichlet",
                 alpha: float = 1.0, seed: int = 0, image_size: int = 64) -> list[Path]:
    from shared_model.data.partition import partition_caption_set
    from shared_model.data.synthetic import load_embedded

    if num_sites < 1:
        raise ValueError(f"--sites must be >= 1, got {num_sites}")
    full = load_embedded("train", train_size, seed=seed, image_size=image_size)
    parts = partition_caption_set(full, num_sites, method=partitioner, alpha=alpha, seed=seed)
    return [write_coco_folder(part, Path(out) / f"site-{k}") for k, part in enumerate(parts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.site_folders", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=2, help="number of site folders (default 2)")
    parser.add_argument("--train-size", type=int, default=4000,
                        help="records in all sites together (default 4000)")
    parser.add_argument("--partitioner", default="dirichlet", choices=("iid", "dirichlet", "quantity"),
                        help="how records are split: iid gives each site the same number (default dirichlet)")
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=64,
                        help="image side in pixels (default 64; sites resize to the run config's image-size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        for folder in export_sites(args.out, args.sites, train_size=args.train_size, partitioner=args.partitioner,
                                   alpha=args.dirichlet_alpha, seed=args.seed, image_size=args.image_size):
            print(folder)
    except (ValueError, FileExistsError) as e:
        print(f"deploy.site_folders: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
