"""What a site enforces every round: the Opacus front door (dp), accountants over DP mechanism events
(accounting), per-record composition (individual), the ledger's transaction, membership and record
identities, the site's budget and grants, the private vocabulary release, and the secret randomness
of a deployed site. The auditor's offline tools live in shared_model/audit/."""
