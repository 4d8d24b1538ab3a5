"""Where centralized training, pretraining and `fedcap evaluate` get their records and vocabulary.

Sources:
  embedded  the embedded private train split; evaluation on its test split
  public    the embedded generator's public variant (shared_model/data/public.py: its own seed
            stream and camera); evaluation on the embedded test split, the data the federation's
            server scores, so a public-only model and a federated one are compared on the same images
  a folder  `data` in `data_format` (coco | karpathy | csv | jsonl, see docs/data.md). Karpathy uses
            its own train/test splits; the other formats hold out every record whose id hashes into
            the first decile (deterministic, at least one record), capped at `test_size`.
The vocabulary is the embedded one for the embedded sources; for a folder, `vocab_file` when given,
else built from the folder's training captions (the data owner's own vocabulary).
"""

from __future__ import annotations

from pathlib import Path

from shared_model.data import CaptionSet, Vocabulary, hash_split

SOURCES = ("embedded", "public")


def load_folder_splits(data: str | Path, data_format: str, *, image_size: int) -> tuple[CaptionSet, CaptionSet]:
    """(train, test) of a dataset folder."""
    from shared_model.data import load_dataset_folder

    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if data_format == "karpathy":
        return (load_dataset_folder("karpathy", root, split="train", image_size=image_size),
                load_dataset_folder("karpathy", root, split="test", image_size=image_size))
    return hash_split(load_dataset_folder(data_format, root, image_size=image_size))


def training_data(*, source: str, data: str, data_format: str, train_size: int, test_size: int, seed: int,
                  image_size: int, vocab_file: str = "") -> tuple[CaptionSet, CaptionSet, Vocabulary]:
    """(train, test, vocabulary) for centralized training or pretraining."""
    from shared_model.data import load_embedded, load_public, synthetic_vocabulary

    if data:
        train, test = load_folder_splits(data, data_format, image_size=image_size)
        test = test.subset(range(min(test_size, len(test))))
        vocab = (Vocabulary.load(Path(vocab_file).expanduser()) if vocab_file else
                 Vocabulary.build(c for caps in train.captions for c in caps))
        return train, test, vocab
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} (or give a data folder), got {source!r}")
    loader = load_public if source == "public" else (lambda n, **kw: load_embedded("train", n, **kw))
    train = loader(train_size, seed=seed, image_size=image_size)
    test = load_embedded("test", test_size, seed=seed, image_size=image_size)
    vocab = Vocabulary.load(Path(vocab_file).expanduser()) if vocab_file else synthetic_vocabulary()
    return train, test, vocab


def evaluation_data(data: str | Path, data_format: str, *, image_size: int, split: str = "test",
                    limit: int | None = None) -> CaptionSet:
    """Records to score a checkpoint on: a folder (every record; karpathy: `split`), or "embedded"
    for the embedded test split."""
    from shared_model.data import load_dataset_folder, load_embedded

    if str(data) == "embedded":
        return load_embedded("test", limit, image_size=image_size)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    records = load_dataset_folder(data_format, root, split=split, image_size=image_size)
    return records if limit is None else records.subset(range(min(limit, len(records))))
