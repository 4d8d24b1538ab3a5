"""Differential privacy: the Opacus front door, accountants over DP-SGD events, the site ledger, the
budget audit and the canary bound.

Names resolve lazily (shared_model/lazy.py): importing the wing imports no heavy library."""

from shared_model.lazy import lazy_exports

_MODULES = {  # submodule: its public names
    'accounting': ('ACCOUNTANTS', 'OPACUS_ACCOUNTANTS', 'DPSGDEvent', 'compute_epsilon'),
    'audit_report': ('format_table', 'table_rows', 'to_json', 'write_report'),
    'canary_bound': ('DEFAULT_GUESS_FRACTIONS', 'CanaryAuditResult', 'GuessResult', 'correct_guesses',
                     'epsilon_lower_bound', 'guess_counts', 'one_run_audit', 'p_value'),
    'dp': ('calibrate_noise_multiplier', 'check_dp_args', 'make_private', 'plan_dp_sgd', 'poisson_plan',
           'private_training', 'unwrap'),
    'ledger': ('BudgetExhaustedError', 'LedgerError', 'PrivacyLedger', 'record_event', 'record_hash'),
    'ledger_audit': ('DEFAULT_ACCOUNTANTS', 'RECORD_TOLERANCE', 'SEVERITIES', 'TIGHT', 'TOLERANCE', 'UPPER_BOUNDS',
                     'AuditResult', 'DatasetAudit', 'Finding', 'RecordCheck', 'SiteAudit', 'audit', 'audit_ledger',
                     'find_ledgers'),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
