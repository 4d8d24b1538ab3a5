"""The server's own data: operator vocabulary and evaluation folder from the run config."""

import numpy as np
import pytest

from deploy.site_folders import write_coco_folder
from server.server_data import server_eval_set, server_vocabulary
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.data.vocab import Vocabulary
from shared_model.run_settings import default_run_config

RC = {**default_run_config(), "server-eval-size": 20}


def test_defaults_are_the_embedded_vocabulary_and_test_split():
    assert server_vocabulary(RC) == synthetic_vocabulary()
    data = server_eval_set(RC, image_size=32)
    assert len(data) == 20 and data.image_ids == load_embedded("test", 20, image_size=32).image_ids


def test_operator_vocabulary_file(tmp_path):
    Vocabulary(["a", "red", "circle"]).save(tmp_path / "vocab.json")
    assert server_vocabulary({**RC, "vocab-file": str(tmp_path / "vocab.json")}).itos[4:] == ["a", "red", "circle"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        server_vocabulary({**RC, "vocab-file": str(tmp_path / "missing.json")})
    (tmp_path / "bad.json").write_text('{"itos": ["x"]}')
    with pytest.raises(ValueError, match="not a FedCap vocabulary"):
        server_vocabulary({**RC, "vocab-file": str(tmp_path / "bad.json")})


def test_server_eval_folder(tmp_path):
    source = load_embedded("test", 30, image_size=32)
    folder = write_coco_folder(source, tmp_path / "eval")
    data = server_eval_set({**RC, "server-eval-data": str(folder)}, image_size=32)
    assert len(data) == 20  # capped at server-eval-size
    np.testing.assert_array_equal(data.images, source.images[:20])
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*nowhere"):
        server_eval_set({**RC, "server-eval-data": str(tmp_path / "nowhere")}, image_size=32)
    with pytest.raises(ValueError, match="'tsv'"):
        server_eval_set({**RC, "server-eval-data": str(folder), "server-eval-format": "tsv"}, image_size=32)
    with pytest.raises(ValueError, match="server-eval-size"):
        server_eval_set({**RC, "server-eval-size": 0}, image_size=32)
