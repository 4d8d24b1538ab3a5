"""How long `fedcap audit` takes on a long site ledger: `python benchmarks/audit_scale.py [--rounds 1000]`.

Writes one site ledger of ROUNDS dp-sgd lines over RECORDS records (a few records added every 50
rounds, so histories differ), with honest per-record epsilons, then times the audit on one core
(torch and BLAS threads pinned to 1) with the default accountants. Prints the figures and, with
--json FILE, writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def write_ledger(folder: Path, *, rounds: int, records: int, accountant: str) -> float:
    from shared_model.privacy.accounting import DPSGDEvent
    from shared_model.privacy.individual import projected_epsilons
    from shared_model.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(folder / "ledger.jsonl")
    members = [f"record-{i:07d}" for i in range(records)]
    event = DPSGDEvent(sample_rate=0.01, noise_multiplier=1.0, steps=10)
    t0 = time.perf_counter()
    with ledger.transaction() as tx:
        histories = tx.histories()
        write = ledger._write
        ledger._write = lambda recs: None  # one write at the end: the set-up is not what is measured
        for r in range(1, rounds + 1):
            if r % 50 == 0:
                members = members + [f"new-{r}-{k}" for k in range(5)]
            eps = max(projected_epsilons(histories, list(histories.groups_of(members)), event, target_delta=1e-6,
                                         accountant=accountant).values())
            tx.append_round(run_id=f"run-{(r - 1) // 100}", server_round=(r - 1) % 100 + 1, event=event,
                            members=members, retired=0, max_grad_norm=1.0, target_epsilon=1e6, target_delta=1e-6,
                            accountant=accountant, epsilon=eps)
        ledger._write = write
        ledger._write(tx.records)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--accountant", default="rdp", help="the site's accountant (per-line checks)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from shared_model.audit.ledger_audit import audit
    from shared_model.privacy.accounting import _epsilon

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "site-0"
        setup = write_ledger(folder, rounds=args.rounds, records=args.records, accountant=args.accountant)
        _epsilon.cache_clear()  # the audit must not profit from the writer's cache
        t0 = time.perf_counter()
        result = audit([folder])
        seconds = time.perf_counter() - t0
        (site,) = result.sites
    figures = {"rounds": args.rounds, "records": site.records, "site_accountant": args.accountant,
               "accountants": list(result.accountants), "audit_seconds": round(seconds, 2),
               "setup_seconds": round(setup, 2), "status": result.status,
               "largest_epsilon": {a: site.epsilon[a] for a in result.accountants}}
    print(f"audit of one site ledger with {args.rounds} rounds, {site.records} records "
          f"(accountants {', '.join(result.accountants)}; per-line checks {args.accountant}), one core: "
          f"{seconds:.1f} s, status {result.status}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
