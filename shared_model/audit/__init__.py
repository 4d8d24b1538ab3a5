"""The auditor's offline tools: recompute a site's spend from its ledger, report it, bound epsilon
from canaries, and migrate old ledgers. Nothing here runs in a training round (the site's enforcement is
shared_model/privacy/)."""
