"""Issue 22 item 5: the physical batch chosen by memory (`max-physical-batch-size = "auto"`) and the
site's device (node_config `device`)."""

import copy
import logging

import pytest
import torch
from conftest import tiny_config

from client.settings import local_training
from client.trainer import train_round
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.devices import resolve_device
from shared_model.model.physical_batch import bytes_per_example, physical_batch_size
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import RunRequest, SiteBudget
from shared_model.run_settings import default_run_config, validate_node_config, validate_run_config

VOCAB = synthetic_vocabulary()
DATA = load_embedded("train", 64, seed=0, image_size=32)
EXAMPLE = (torch.rand(3, 32, 32), torch.tensor([1, 5, 6, 2] + [0] * 16))


def model():
    torch.manual_seed(3)
    return Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))


def test_the_probe_counts_per_example_gradients_and_activations():
    m = model()
    plain = bytes_per_example(m, EXAMPLE, grad_sample_mode=None)
    hooks = bytes_per_example(m, EXAMPLE, grad_sample_mode="hooks")
    params = sum(p.numel() * 4 for p in m.parameters())
    assert plain > 0 and hooks == 2 * plain + params  # a per-example gradient of every parameter under hooks
    assert bytes_per_example(m, EXAMPLE, grad_sample_mode="ghost") == 2 * plain  # ghost keeps no gradients
    size, per_example = physical_batch_size(m, EXAMPLE, budget=10 * hooks + 1, cap=128, grad_sample_mode="hooks")
    assert (size, per_example) == (10, hooks)
    assert physical_batch_size(m, EXAMPLE, budget=1, cap=128, grad_sample_mode="hooks")[0] == 1  # at least one
    assert physical_batch_size(m, EXAMPLE, budget=2**40, cap=128, grad_sample_mode="hooks")[0] == 128


def dp_round(tmp_path, name, net, physical, memory_limit=None):
    training = local_training({**default_run_config(), "local-epochs": 1, "batch-size": 16, "lr": 1e-2,
                               "grad-sample-mode": "hooks", "max-physical-batch-size": physical}, {})
    request = RunRequest(run_id="r1", run_epsilon=2.0, num_rounds=1, local_epochs=1, batch_size=16,
                         count_noise_multiplier=5.0)
    torch.manual_seed(0)
    return train_round(model=net, data=DATA, vocab=VOCAB, training=training,
                       budget=SiteBudget(target_epsilon=3.0, target_delta=1e-3, accountant="rdp"),
                       ledger=PrivacyLedger(tmp_path / name / "ledger.jsonl"), request=request, server_round=1,
                       seed=0, memory_limit=memory_limit)


def test_auto_splits_batches_by_memory_and_changes_nothing_the_ledger_or_the_model_sees(tmp_path, caplog):
    start = model()
    per_example = bytes_per_example(start, EXAMPLE, grad_sample_mode="hooks")
    fixed, auto = copy.deepcopy(start), copy.deepcopy(start)
    a = dp_round(tmp_path, "fixed", fixed, 128)
    with caplog.at_level(logging.INFO, logger="client.trainer"):
        b = dp_round(tmp_path, "auto", auto, "auto", memory_limit=3 * per_example + 10)
    assert "max-physical-batch-size auto: physical batch 3 " in caplog.text  # 16-record batches in threes
    assert a == {**b, "ledger-head": a["ledger-head"]}  # the same sampling, noise and accounting
    lines = [[{k: v for k, v in r.items() if k not in ("time", "hash", "prev_hash")}
              for r in PrivacyLedger(tmp_path / name / "ledger.jsonl").records()] for name in ("fixed", "auto")]
    assert lines[0] == lines[1]
    for (name, p), q in zip(fixed.named_parameters(), auto.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_the_settings_accept_auto_and_a_device_by_name():
    assert validate_run_config({**default_run_config(), "max-physical-batch-size": "auto"})
    with pytest.raises(TypeError, match="max-physical-batch-size must be an integer >= 1 or 'auto', got 'big'"):
        validate_run_config({**default_run_config(), "max-physical-batch-size": "big"})
    site = {"partition-id": 0, "num-partitions": 1}
    assert validate_node_config(site)["device"] == "auto"
    assert validate_node_config({**site, "device": "cuda:1", "memory-limit": 8})["memory-limit"] == 8.0
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu0'"):
        validate_node_config({**site, "device": "gpu0"})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1' requested but CUDA is not available"):
            resolve_device("cuda:1")
