"""Differential privacy: the Opacus front door, accountants over DP-SGD events, the site ledger, the
private vocabulary release, the budget audit and the canary bound.

Names resolve lazily (shared_model/lazy.py): importing the wing imports no heavy library."""

from shared_model.lazy import lazy_exports

_MODULES = {  # submodule: its public names
    'accounting': ('ACCOUNTANTS', 'OPACUS_ACCOUNTANTS', 'DPSGDEvent', 'add_to_signature', 'compute_epsilon',
                   'dominates', 'gaussian_event', 'merge_events', 'signature', 'signature_epsilon'),
    'audit_report': ('format_table', 'table_rows', 'to_json', 'write_report'),
    'canary_bound': ('DEFAULT_GUESS_FRACTIONS', 'CanaryAuditResult', 'GuessResult', 'correct_guesses',
                     'epsilon_lower_bound', 'guess_counts', 'one_run_audit', 'p_value'),
    'dp': ('GHOST_DECODERS', 'GRAD_SAMPLE_CHOICES', 'GRAD_SAMPLE_MODES', 'calibrate_noise_multiplier',
           'check_dp_args', 'check_grad_sample_mode', 'make_private', 'plan_dp_sgd', 'poisson_plan',
           'private_training', 'resolve_grad_sample_mode', 'unwrap'),
    'individual': ('RecordHistories', 'max_signature_epsilon', 'projected_epsilons'),
    'ledger': ('COMMON', 'EVENT_KINDS', 'FEDERATION_STATE_FORMAT', 'MIGRATE_HINT', 'OLD_FORMATS', 'BudgetExhaustedError',
               'LedgerError', 'LedgerRollbackError', 'LedgerTransaction', 'PrivacyLedger', 'build_histories',
               'check_witness', 'ledger_head', 'load_federation_state', 'record_event', 'record_hash'),
    'ledger_audit': ('DEFAULT_ACCOUNTANTS', 'RECORD_TOLERANCE', 'SEVERITIES', 'TIGHT', 'TOLERANCE', 'UPPER_BOUNDS',
                     'AuditResult', 'Finding', 'LineCheck', 'RunGrant', 'SiteAudit', 'audit', 'audit_ledger',
                     'check_witnessed_heads', 'find_ledgers'),
    'membership': ('SNAPSHOT_EVERY', 'MembershipError', 'MembershipStore', 'membership_version'),
    'migrate': ('V1', 'migrate_v1', 'read_v1'),
    'site_budget': ('CountRelease', 'RoundPlan', 'RunRequest', 'SiteBudget', 'make_grant', 'plan_round',
                    'public_epsilon', 'release_count', 'run_epsilon_alone', 'run_plan'),
    'vocab_release': ('VocabRelease', 'clipped_counts', 'merge_releases', 'noisy_release', 'record_words',
                      'release_vocabulary'),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
