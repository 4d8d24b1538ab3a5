"""Issue 19: accounting a reviewer can sign. A filter proved at one Rényi order fixed by the budget,
the exact steps that ran, and an audit that recomputes the mechanism from the ledger, on ledgers
written by real Opacus rounds."""

import pytest
import torch
from conftest import rewrite_ledger, tiny_config
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from client.settings import local_training
from client.trainer import train_round
from shared_model.data.datasets import CaptionDataset
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.training import train_epoch
from shared_model.privacy.accounting import DPSGDEvent, compute_epsilon, filter_order
from shared_model.privacy.dp import private_training
from shared_model.privacy.history import build_histories
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.audit.ledger_audit import audit
from shared_model.privacy.site_budget import RunRequest, SiteBudget, run_plan
from shared_model.run_settings import default_run_config

TRAINING = local_training({**default_run_config(), "local-epochs": 1, "batch-size": 16, "lr": 1e-3}, {})

VOCAB = synthetic_vocabulary()
BUDGET = SiteBudget(target_epsilon=4.0, target_delta=1e-3, accountant="rdp")


def test_the_filter_enforces_one_order_fixed_by_the_budget_alone():
    """Feldman and Zrnic's filter holds at one Rényi order fixed in advance: the site's order is a
    function of its budget, so it is fixed before its first mechanism and never moves."""
    assert BUDGET.enforcing == f"rdp@{filter_order(4.0, 1e-3):g}" == SiteBudget(
        target_epsilon=4.0, target_delta=1e-3, max_run_epsilon=1.0, min_records=5).enforcing
    assert [filter_order(e, 1e-5) for e in (8.0, 4.0, 2.0)] == [3.4, 5.7, 9.9]  # of Opacus's grid
    # the fixed order's epsilon bounds the grid's best order after the fact, for any history
    for events in ([DPSGDEvent(sample_rate=1 / 8, noise_multiplier=0.95, steps=48)],
                   [DPSGDEvent(sample_rate=1.0, noise_multiplier=20.0, steps=1),
                    DPSGDEvent(sample_rate=1 / 3, noise_multiplier=3.0, steps=18)]):
        fixed = compute_epsilon(events, target_delta=1e-5, accountant=f"rdp@{filter_order(8.0, 1e-5):g}")
        assert fixed >= compute_epsilon(events, target_delta=1e-5, accountant="rdp")


def test_the_plan_takes_exactly_its_steps_at_every_batch_count():
    """Opacus's sampler takes int(1 / rate) batches per epoch; int(1 / (1 / 93)) == 92. The site
    sets the sampler's steps to the plan's, so the ledger's steps are the steps that run."""
    request = RunRequest(run_id="r", run_epsilon=1.0, num_rounds=3, local_epochs=2, batch_size=7,
                         count_noise_multiplier=20.0)
    off_by_one = 0
    for batches in range(1, 2001):
        rate, steps, n = run_plan(batches * 7, batch_size=request.batch_size, local_epochs=request.local_epochs)
        assert (rate, steps, n) == (1.0 / batches, 2 * batches, batches * 7)
        assert len(UniformWithReplacementSampler(num_samples=n, sample_rate=rate, steps=steps // 2)) == batches
        off_by_one += int(1 / rate) != batches
    assert off_by_one > 50  # what the ledger would have got wrong without it (93, 99, 105, ...)


def test_a_real_round_at_an_awkward_count_takes_its_planned_steps():
    data = load_embedded("train", 93, seed=0, image_size=32)
    model = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))
    event = DPSGDEvent(sample_rate=1 / 93, noise_multiplier=1.0, steps=93)
    assert int(1 / event.sample_rate) == 92
    _, private, optimizer, loader = private_training(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=CaptionDataset(data, VOCAB, max_len=20), event=event, epochs=1, expected_batch_size=1.0,
        max_grad_norm=1.0, accountant="rdp")
    assert train_epoch(private, optimizer, loader, device="cpu", max_physical_batch_size=8)["steps"] == 93


def site_ledger(tmp_path, rounds=2):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    data = load_embedded("train", 40, seed=0, image_size=32)
    request = RunRequest(run_id="r1", run_epsilon=2.0, num_rounds=rounds, local_epochs=1, batch_size=16,
                         count_noise_multiplier=5.0)
    for rnd in range(1, rounds + 1):
        model = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))
        train_round(model=model, data=data, vocab=VOCAB, training=TRAINING,
                    budget=BUDGET, ledger=ledger, request=request, server_round=rnd, seed=0)
    return ledger


def _dp_sgd(records):
    return [r for r in records if r["kind"] == "dp-sgd"]


def _set(kind, **fields):
    def edit(records):
        for r in records:
            if r["kind"] == kind:
                r.update({k: (v(r) if callable(v) else v) for k, v in fields.items()})
    return edit


TAMPERINGS = {  # issue 19 (5): each rewrites the whole chain consistently, as the site's owner could
    "noise tripled": _set("dp-sgd", noise_multiplier=lambda r: 3 * r["noise_multiplier"]),
    "noise tripled, grant too": lambda rs: [_set(k, noise_multiplier=lambda r: 3 * r["noise_multiplier"])(rs)
                                            for k in ("dp-sgd", "grant")] and None,
    "sample rate / 10": _set("dp-sgd", sample_rate=lambda r: r["sample_rate"] / 10),
    "sample rate / 10, grant too": lambda rs: [_set(k, sample_rate=lambda r: r["sample_rate"] / 10)(rs)
                                               for k in ("dp-sgd", "grant")] and None,
    "steps set to 1": _set("dp-sgd", steps=1),
    "a round trained twice": lambda rs: _set("dp-sgd", server_round=1)(rs),
    "delta 0.5": _set("dp-sgd", target_delta=0.5),
    "target epsilon 1000 on one line": lambda rs: _dp_sgd(rs)[-1].update(target_epsilon=1000.0),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_the_audit_recomputes_the_mechanism_not_only_the_epsilon(tmp_path, tampering):
    ledger = site_ledger(tmp_path)
    assert audit([tmp_path]).status == "ok"
    rewrite_ledger(ledger.path, TAMPERINGS[tampering])
    result = audit([tmp_path])
    assert result.status in ("failure", "error") or (result.status == "warning" and "target epsilon" in tampering)
    assert result.exit_code(strict=True) != 0


def test_what_only_the_witness_can_catch(tmp_path):
    """A deleted last line, or every line's budget raised consistently, leaves a ledger that is the
    honest ledger of another history: the audit passes it without the witness and fails it with."""
    ledger = site_ledger(tmp_path)
    head = ledger.records()[-1]
    rewrite_ledger(ledger.path, lambda rs: rs[:-1])
    assert audit([tmp_path]).status == "ok"
    import json

    state = tmp_path / "federation-state.json"
    state.write_text(json.dumps({"format": "fedcap-federation-state/1", "sites": {tmp_path.name: {
        "head": head["hash"], "records": 4, "run_id": "r1", "server_round": 2, "time": head["time"]}}}))
    assert [f.kind for f in audit([tmp_path], federation_state=state).findings] == ["witness-missing"]
    # another site's witness, its ledger simply not given: the message says how to audit one site
    doc = json.loads(state.read_text())
    doc["sites"]["other-site"] = doc["sites"][tmp_path.name]
    state.write_text(json.dumps(doc))
    other = [f for f in audit([tmp_path], federation_state=state).findings if f.site == "other-site"]
    assert f"--site {tmp_path.name}" in other[0].message


def test_delta_composes_in_the_audit(tmp_path):
    """A vocabulary release's thresholding delta adds to its records' delta; a ledger whose records
    passed target-delta fails the audit (exit 1)."""
    ledger = site_ledger(tmp_path, rounds=1)
    ids = sorted(build_histories(ledger.records(), ledger.membership)[0].group_of)
    with ledger.transaction() as tx:
        tx.append_vocab_release(run_id="v", members=ids, retired=0, noise_multiplier=50.0, max_words_per_record=3,
                                threshold=10.0, threshold_delta=1e-3, words_released=3, target_epsilon=4.0,
                                target_delta=1e-3, accountant=BUDGET.enforcing, epsilon=4.0)
    result = audit([tmp_path])
    assert "delta-exceeded" in {f.kind for f in result.findings} and result.exit_code() == 1
    assert result.sites[0].threshold_delta == 1e-3


def _trained_ids(ledger):
    histories, _ = build_histories(ledger.records(), ledger.membership)
    return histories


def test_a_record_keeps_its_history_through_ordinary_edits(tmp_path):
    """Issue 19 (4): a caption edit, a reorder, a re-encoding under the same name, a copy that drops
    one caption: each is the record the ledger knows, not a fresh one. A new image is new."""
    import numpy as np

    from shared_model.data.records import CaptionSet

    ledger = site_ledger(tmp_path, rounds=1)
    before = _trained_ids(ledger)
    data = load_embedded("train", 40, seed=0, image_size=32)
    images = np.array(data.images)
    images[1, 0, 0, 0] ^= 1  # re-encoded: one bit of the pixels, same declared id
    captions = [list(c) for c in data.captions]
    captions[0] = [captions[0][0] + " ."] + captions[0][1:]  # a caption edited
    captions[2] = list(reversed(captions[2]))  # captions reordered
    edited = CaptionSet(images=images, captions=captions, image_ids=list(data.image_ids))
    copy = CaptionSet(images=images[3:4], captions=[captions[3][1:] or captions[3]], image_ids=["copy-of-3"])
    fresh = load_embedded("train", 41, seed=0, image_size=32).subset([40])
    grown = CaptionSet(images=np.concatenate([edited.images, copy.images, fresh.images]),
                       captions=[*edited.captions, *copy.captions, *fresh.captions],
                       image_ids=[*edited.image_ids, *copy.image_ids, *fresh.image_ids])
    assert len(set(grown.record_ids()) - set(before.group_of)) == 5  # content IDs alone: 5 "new" records
    request = RunRequest(run_id="r2", run_epsilon=1.0, num_rounds=1, local_epochs=1, batch_size=16,
                         count_noise_multiplier=5.0)
    train_round(model=Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20)), data=grown, vocab=VOCAB,
                training=TRAINING, budget=BUDGET, ledger=ledger,
                request=request, server_round=1, seed=0)
    after = _trained_ids(ledger)
    new = set(after.group_of) - set(before.group_of)
    assert new == set(fresh.record_ids())  # only the new image starts from zero
    last = [r for r in ledger.records() if r["kind"] == "dp-sgd"][-1]
    assert last["records_trained"] == 41  # the copy of record 3 is record 3: trained once


def test_one_data_dir_has_one_state_dir(tmp_path):
    from shared_model.privacy.identity import bind_data_dir

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    bind_data_dir(data_dir, tmp_path / "state-a")
    bind_data_dir(data_dir, tmp_path / "state-a")  # the same site again
    with pytest.raises(ValueError, match=r"is bound to state-dir .*state-a .*not .*state-b"):
        bind_data_dir(data_dir, tmp_path / "state-b")
