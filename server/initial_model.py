"""The model a federation starts from: fresh, resumed (`resume-from`) or pretrained (`init-from`).

`resume-from` continues an earlier FedCap run from one of its checkpoints. `init-from` starts a new
federation from a pretrained checkpoint (`fedcap pretrain`, public data, no site budget spent): its
weights AND its vocabulary, so a `vocab-file` that differs from the checkpoint's vocabulary is an
error, and so is a run config whose model settings do not describe the checkpoint's model (the
sites build their model from the run config). The SHA-256 of the init checkpoint's
model.safetensors goes to the sites in every train ConfigRecord (`init-checkpoint`, "" when none),
for their ledgers, and into the run folder (init_checkpoint.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from shared_model.data.vocab import Vocabulary
from shared_model.util import atomic_write


@dataclass(frozen=True)
class InitialModel:
    model: Any  # Captioner
    vocab: Vocabulary
    source: str  # "fresh", "resume-from" or "init-from"
    checkpoint: str = ""  # the checkpoint folder, "" when fresh
    sha256: str = ""  # of <checkpoint>/model.safetensors for init-from, else ""

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "checkpoint": self.checkpoint, "init-checkpoint": self.sha256}


def initial_model(run_config: Mapping[str, Any], vocab: Vocabulary) -> InitialModel:
    """`vocab` is the server's vocabulary (vocab-file or embedded)."""
    import torch

    from shared_model.model.captioner import Captioner
    from shared_model.model.checkpoint import checkpoint_sha256, load_checkpoint
    from shared_model.model.config import captioner_config_from_run_config
    from shared_model.model.trainable import check_trainable
    from shared_model.model.config import check_same_model

    check_trainable(str(run_config["trainable"]))
    resume, init = str(run_config["resume-from"]), str(run_config["init-from"])
    if resume and init:
        raise ValueError(f"give resume-from ({resume}) or init-from ({init}), not both")
    vocab_file = str(run_config["vocab-file"])
    if resume or init:
        key, path = ("resume-from", resume) if resume else ("init-from", init)
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"{key} checkpoint folder not found: {path}")
        model, saved_vocab, _ = load_checkpoint(Path(path).expanduser())
        if vocab_file and saved_vocab != vocab:
            raise ValueError(f"vocab-file {vocab_file} ({len(vocab)} words) differs from the vocabulary of {key} "
                             f"{path} ({len(saved_vocab)} words): drop vocab-file or use the checkpoint's vocab.json")
        # one rule for every start from a checkpoint (model.config.check_same_model): training-only fields
        # aside, except freeze_encoder where it changes a BatchNorm encoder's weights
        check_same_model(model.config, captioner_config_from_run_config(run_config, vocab_size=len(saved_vocab)),
                         what=f"{key} checkpoint {path}")
        sha = checkpoint_sha256(Path(path).expanduser()) if init else ""
        return InitialModel(model=model, vocab=saved_vocab, source=key, checkpoint=str(Path(path).expanduser()),
                            sha256=sha)
    torch.manual_seed(int(run_config["seed"]))
    return InitialModel(model=Captioner(captioner_config_from_run_config(run_config, vocab_size=len(vocab))),
                        vocab=vocab, source="fresh")


def write_init_record(run_dir: Path, init: InitialModel) -> Path:
    """<run folder>/init_checkpoint.json: where the federation's weights came from."""
    path = Path(run_dir) / "init_checkpoint.json"
    atomic_write(path, (json.dumps(init.record(), indent=2) + "\n").encode("utf-8"))
    return path
