"""What the server owns: the vocabulary it ships with the model and its evaluation set.

The vocabulary is never pooled from site captions: the operator supplies it (`vocab-file`, a
fedcap-vocab/1 JSON built from public or server-owned text) or the embedded one (the grammar's
words of `data-scenario`) is used; sites map words outside it to <unk>. The evaluation set is
`server-eval-data` (a folder in `server-eval-format`) or, by default, the embedded test split of
`data-scenario`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from shared_model.data.records import CaptionSet
from shared_model.data.vocab import Vocabulary

def server_vocabulary(run_config: Mapping[str, Any]) -> Vocabulary:
    from shared_model.data.synthetic import synthetic_vocabulary

    path = str(run_config["vocab-file"])
    if path:
        return Vocabulary.load(Path(path).expanduser())
    return synthetic_vocabulary(str(run_config["data-scenario"]))


def server_eval_set(run_config: Mapping[str, Any], *, image_size: int) -> CaptionSet:
    from shared_model.data.loaders import load_dataset_folder
    from shared_model.data.synthetic import load_embedded

    path = str(run_config["server-eval-data"])
    size = int(run_config["server-eval-size"])
    if size < 1:
        raise ValueError(f"server-eval-size must be >= 1, got {size}")
    if not path:
        return load_embedded("test", size, seed=int(run_config["seed"]), image_size=image_size,
                             scenario=str(run_config["data-scenario"]))
    data = load_dataset_folder(str(run_config["server-eval-format"]), Path(path).expanduser(),
                               split="test", image_size=image_size)
    return data.subset(range(min(size, len(data))))
