"""Issue 23's summary papercuts: a site without a budget shows "non-private", never a budget of 0; a
site that refused for budget shows what it has left; every score table names its decoding. A real
run folder and summary.md, the strategy's reporting fields as the ServerApp hands them over."""

import math

from server.outputs import NothingTrained, RunOutputs
from shared_model.privacy.reply import BUDGET_METRICS
from runners.flower_runtime import default_run_config

RC = {**default_run_config(), "eval-beam-size": 1}


def budget_row(summary: str, site: str) -> dict[str, str]:
    row = next(line for line in summary.splitlines() if line.startswith(f"| {site} | "))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    return dict(zip([*BUDGET_METRICS, "budget exhausted"], cells))


def test_non_private_and_refused_sites_show_their_budget_truthfully(tmp_path):
    outputs = RunOutputs(tmp_path / "run-1")
    outputs.log_round({"round": 0, "BLEU-4": 0.1, "ROUGE-L": 0.3, "CIDEr-D": 1.2, "loss": 2.0})
    # what client/privacy/reply.py's TrainMetrics.non_private reports, and what a budget refusal reports
    non_private = {"epsilon": math.inf, "delta": 0.0, "target-epsilon": 0.0, "epsilon-remaining": 0.0,
                   "run-epsilon-granted": 0.0, "run-epsilon-spent": 0.0}
    refused = {"epsilon": 5.5, "delta": 1e-5, "target-epsilon": 6.0}
    trained = {"epsilon": 1.25, "delta": 1e-5, "target-epsilon": 6.0, "epsilon-remaining": 4.75,
               "run-epsilon-granted": 1.5, "run-epsilon-spent": 1.25}
    strategy = NothingTrained([], site_budget={"baseline": non_private, "full": {**trained, **refused},
                                               "ok": trained}, exhausted=frozenset({"full"}))
    summary = outputs.write_summary(run_config=RC, strategy=strategy, ended="failed", seconds=1.0).read_text()
    assert budget_row(summary, "baseline") == {"epsilon": "non-private", "delta": "-", "target-epsilon": "-",
                                               "epsilon-remaining": "-", "run-epsilon-granted": "-",
                                               "run-epsilon-spent": "-", "budget exhausted": ""}
    # the refusal's own spend, not the 4.75 an earlier trained round reported
    full = budget_row(summary, "full")
    assert (full["epsilon"], full["epsilon-remaining"], full["budget exhausted"]) == ("5.5", "0.5", "yes")
    assert budget_row(summary, "ok")["epsilon-remaining"] == "4.75"
    assert "Scored on the server's evaluation set, greedy decoding (beam 1)" in summary


def test_a_run_refused_by_every_site_leaves_no_budget_cell_blank(tmp_path):
    outputs = RunOutputs(tmp_path / "run-2")
    refused = {"epsilon": 6.0, "delta": 1e-5, "target-epsilon": 6.0}
    strategy = NothingTrained([{"round": 1, "site": "a", "node": 1, "kind": "refused", "reason": "budget exhausted"}],
                              site_budget={"a": refused}, exhausted=frozenset({"a"}))
    summary = outputs.write_summary(run_config={**RC, "eval-beam-size": 3}, strategy=strategy, ended="failed",
                                    seconds=1.0).read_text()
    assert budget_row(summary, "a")["epsilon-remaining"] == "0"
    assert "beam search (beam 3)" in summary
