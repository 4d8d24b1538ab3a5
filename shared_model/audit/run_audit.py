"""Does a site's ledger describe runs that ran what their grants planned? (the audit's mechanism checks)

Each run's lines are checked against each other, from the ledger alone: the grant's plan against
the run's noisy count (site_budget.run_plan's rule), every round's mechanism against the grant,
the rounds against the plan, and everything the run did against its allowance (site_budget.run_spend).
A ledger rewritten consistently into the honest ledger of another history passes these checks;
only the server's witness catches that (docs/privacy.md, "Auditing a privacy budget").
"""

from __future__ import annotations

from typing import Any

from shared_model.privacy.ledger_lines import EVENT_KINDS, record_event, record_extra_delta
from shared_model.privacy.site_budget import run_plan, run_spend


def check_runs(records: list[dict[str, Any]]) -> list[tuple[str, str, int | None]]:
    """(severity, message, line) for every run that did not run what its ledger says it planned: a
    dp-sgd line of a run without a grant in a ledger that has grants (a warning); a grant whose sample rate, steps or record count do not follow from
    its run's count line (rate 1 / ceil(round(noisy count) / batch size), that many batches per
    epoch); a round outside 1..num_rounds or trained twice; a dp-sgd line whose noise multiplier,
    sample rate or steps differ from the grant's; mechanisms that together spend more than the grant
    (site_budget.run_spend: a record in all of them, in the grant's accountant's terms); a
    target-delta at or above 1 / (records counted), which allows publishing a record outright."""
    out = []
    grants = {r["run_id"]: (n, r) for n, r in enumerate(records, 1) if r["kind"] == "grant"}
    for n, r in enumerate(records, 1):
        # a ledger written by a site since grants exist has one for every run; migrated runs ("(v1)")
        # and hand-built ledgers without any grant are checked line by line only
        if r["kind"] == "dp-sgd" and grants and r["run_id"] not in grants and not r["run_id"].endswith("(v1)"):
            out.append(("warning", f"line {n}: a dp-sgd round of run {r['run_id']} whose run has no grant line "
                                   f"(a migrated ledger, or a deleted grant)", n))
        counted = r.get("records_counted") or r.get("records_trained")
        if r["kind"] in EVENT_KINDS and counted and r["target_delta"] * counted >= 1:
            out.append(("failure", f"line {n}: target_delta {r['target_delta']:g} is not below 1 / {counted} records: such a "
                        f"delta allows a mechanism that publishes a record outright", n))
    for run, (gline, grant) in grants.items():
        lines = [(n, r) for n, r in enumerate(records, 1) if r["kind"] in EVENT_KINDS and r["run_id"] == run]
        count = next((r for _, r in lines if r["kind"] == "count-gaussian"), None)
        per_round = grant["planned_steps"] // max(1, grant["num_rounds"])
        if count is not None:
            rate, per_round, noisy = run_plan(count["noisy_count"], batch_size=grant["batch_size"],
                                              local_epochs=grant["local_epochs"])
            expected = (rate, grant["num_rounds"] * per_round, noisy)
            if (grant["sample_rate"], grant["planned_steps"], grant["records"]) != expected:
                out.append(("failure", f"run {run} line {gline}: the grant's sample rate {grant['sample_rate']:.6g}, planned steps "
                            f"{grant['planned_steps']} and records {grant['records']} do not follow from the run's noisy "
                            f"count {count['noisy_count']:.2f} (expected {expected})", gline))
        rounds = [int(r["server_round"]) for _, r in lines if r["kind"] == "dp-sgd"]
        for n, r in lines:
            if r["kind"] != "dp-sgd":
                continue
            planned = (grant["noise_multiplier"], grant["sample_rate"], per_round)
            if (r["noise_multiplier"], r["sample_rate"], r["steps"]) != planned:
                out.append(("failure", f"run {run} line {n}: noise {r['noise_multiplier']:g}, sample rate {r['sample_rate']:.6g}, "
                            f"{r['steps']} steps differ from the grant's plan {planned}", n))
            if not 1 <= r["server_round"] <= grant["num_rounds"] or rounds.count(r["server_round"]) > 1:
                out.append(("failure", f"run {run} line {n}: round {r['server_round']} is outside 1..{grant['num_rounds']} or "
                            f"was trained twice", n))
        spent = run_spend([record_event(r) for _, r in lines], accountant=grant["accountant"],
                          target_epsilon=grant["target_epsilon"], target_delta=grant["target_delta"],
                          extra_delta=sum(record_extra_delta(r) for _, r in lines))
        if spent > grant["granted_epsilon"] * (1 + 1e-4):
            out.append(("failure", f"run {run}: its mechanisms cost epsilon {spent:.6g} ({grant['accountant']}) for a record in "
                        f"all of them, more than its grant of {grant['granted_epsilon']:.6g}", None))
    return out
