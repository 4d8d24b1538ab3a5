"""Where centralized training, pretraining and `fedcap evaluate` get their records and vocabulary.

Sources:
  embedded  the embedded private train split; evaluation on its test split
  public    the embedded generator's public variant (shared_model/data/public.py: its own seed
            stream and camera); evaluation on the embedded test split, the data the federation's
            server scores, so a public-only model and a federated one are compared on the same images
  shifted, shifted-public   the same two for the shifted data scenario (data-scenario = "shifted":
            the sites' content differs from the public set's; shared_model/data/synthetic.py)
  folders   `data`, one or more folders in `data_format` (coco | karpathy | csv | jsonl, see
            docs/data.md), trained on as one set: each folder is split on its own (karpathy: its own
            train/test splits; the other formats hold out every record whose image hashes into the
            first decile, deterministic, at least one record), the training parts joined and the
            held-out parts joined, then capped at `test_size`. Image ids are prefixed with the
            folder's position when several folders are given ("1:img.png"), so they never collide.
The vocabulary is the scenario's grammar vocabulary for the embedded sources; for folders,
`vocab_file` when given, else built from their training captions (the data owner's own vocabulary).
"""

from __future__ import annotations

from pathlib import Path

from shared_model.data.partition import hash_split
from shared_model.data.records import CaptionSet
from shared_model.data.vocab import Vocabulary

SOURCES = ("embedded", "public", "shifted", "shifted-public")


def load_folder_splits(data: str | Path, data_format: str, *, image_size: int) -> tuple[CaptionSet, CaptionSet]:
    """(train, test) of a dataset folder."""
    from shared_model.data.loaders import load_dataset_folder

    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if data_format == "karpathy":
        return (load_dataset_folder("karpathy", root, split="train", image_size=image_size),
                load_dataset_folder("karpathy", root, split="test", image_size=image_size))
    return hash_split(load_dataset_folder(data_format, root, image_size=image_size))


def join(sets: list[CaptionSet]) -> CaptionSet:
    """One CaptionSet of several (folders), image ids prefixed with the set's position."""
    import numpy as np

    if len(sets) == 1:
        return sets[0]
    digests = None if any(s.source_digests is None for s in sets) else [d for s in sets for d in s.source_digests]
    return CaptionSet(images=np.concatenate([s.images for s in sets]),
                      captions=[c for s in sets for c in s.captions],
                      image_ids=[f"{k}:{i}" for k, s in enumerate(sets) for i in s.image_ids],
                      source_digests=digests)


def training_data(*, source: str, data: str | list[str], data_format: str, train_size: int, test_size: int, seed: int,
                  image_size: int, vocab_file: str = "") -> tuple[CaptionSet, CaptionSet, Vocabulary]:
    """(train, test, vocabulary) for centralized training or pretraining."""
    from shared_model.data.public import load_public
    from shared_model.data.synthetic import load_embedded, synthetic_vocabulary

    folders = [f for f in ([data] if isinstance(data, (str, Path)) else data) if str(f)]
    if folders:
        splits = [load_folder_splits(folder, data_format, image_size=image_size) for folder in folders]
        train, test = join([t for t, _ in splits]), join([t for _, t in splits])
        test = test.subset(range(min(test_size, len(test))))
        vocab = (Vocabulary.load(Path(vocab_file).expanduser()) if vocab_file else
                 Vocabulary.build(c for caps in train.captions for c in caps))
        return train, test, vocab
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} (or give a data folder), got {source!r}")
    scenario = source_scenario(source)
    loader = load_public if source.endswith("public") else (lambda n, **kw: load_embedded("train", n, **kw))
    train = loader(train_size, seed=seed, image_size=image_size, scenario=scenario)
    test = load_embedded("test", test_size, seed=seed, image_size=image_size, scenario=scenario)
    vocab = Vocabulary.load(Path(vocab_file).expanduser()) if vocab_file else synthetic_vocabulary(scenario)
    return train, test, vocab


def evaluation_data(data: str | Path, data_format: str, *, image_size: int, split: str = "test",
                    limit: int | None = None) -> CaptionSet:
    """Records to score a checkpoint on: a folder (every record; karpathy: `split`), or "embedded"
    ("shifted") for the embedded (shifted) scenario's test split."""
    from shared_model.data.loaders import load_dataset_folder
    from shared_model.data.synthetic import SCENARIOS, load_embedded

    if str(data) in SCENARIOS:
        return load_embedded("test", limit, image_size=image_size, scenario=str(data))
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    records = load_dataset_folder(data_format, root, split=split, image_size=image_size)
    return records if limit is None else records.subset(range(min(limit, len(records))))


def source_scenario(source: str) -> str:
    """The data scenario (run-config data-scenario) an embedded source draws from: its vocabulary's."""
    return source.removesuffix("-public") if source != "public" else "embedded"


def public_source(scenario: str) -> str:
    """The embedded source of a data scenario's public variant (what its pretraining reads); the
    inverse of source_scenario on the public sources."""
    return "public" if scenario == "embedded" else f"{scenario}-public"
