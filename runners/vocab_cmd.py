"""`fedcap vocab`: build a fedcap-vocab/1 vocabulary from public caption folders (docs/data.md).

A vocabulary travels with the model to every site, so it must not be built from the sites' private
captions (their rare words would leak to everyone): build it from public or server-owned text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VOCAB_EXIT_CODES = "exit codes: 0 written; 2 a missing or unreadable folder, a bad option, an existing --out without --force"


def add_vocab_parser(sub) -> None:
    from .cli import HelpFormatter

    v = sub.add_parser("vocab", help="build a vocabulary file from public caption folders",
                       description=__doc__.split("\n\n")[0], epilog=VOCAB_EXIT_CODES, formatter_class=HelpFormatter)
    v.add_argument("data", nargs="+", type=Path, metavar="DIR", help="public data folders (one format)")
    v.add_argument("--format", default="coco", help="coco | karpathy | csv | jsonl")
    v.add_argument("--out", type=Path, required=True, help="the vocabulary file to write (JSON)")
    v.add_argument("--min-count", type=int, default=1, help="keep words seen at least this often")
    v.add_argument("--max-size", type=int, help="keep at most this many words, most frequent first")
    v.add_argument("--coverage", type=Path, action="append", metavar="DIR",
                   help="also print the share of this folder's caption tokens the vocabulary covers")
    v.add_argument("--force", action="store_true", help="overwrite --out")
    v.set_defaults(func=run_vocab)


def _captions(folder: Path, fmt: str) -> list[str]:
    from shared_model.data.loaders import load_dataset_folder

    data = load_dataset_folder(fmt, folder, image_size=8)  # the loaders' checks; tiny images
    return [c for caps in data.captions for c in caps]


def run_vocab(args: argparse.Namespace) -> int:
    from shared_model.data.vocab import Vocabulary

    if args.out.exists() and not args.force:
        raise ValueError(f"--out {args.out} exists (use --force to overwrite)")
    captions = [c for folder in args.data for c in _captions(folder, args.format)]
    if not captions:
        raise ValueError(f"no captions found in {', '.join(map(str, args.data))}")
    vocab = Vocabulary.build(captions, min_count=args.min_count, max_size=args.max_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    vocab.save(args.out)
    print(f"vocabulary: {len(vocab) - 4} words (+4 special tokens) from {len(captions)} captions -> {args.out}")
    print(f"coverage of its own captions: {vocab.coverage(captions):.1%}")
    for folder in args.coverage or ():
        print(f"coverage of {folder}: {vocab.coverage(_captions(folder, args.format)):.1%}")
    sys.stdout.flush()
    return 0
