"""Programs over the library: the `fedcap` CLI, centralized training and the Flower runtime helpers.

Names resolve lazily (shared_model/lazy.py): importing the wing imports no heavy library."""

from shared_model.lazy import lazy_exports

_MODULES = {  # submodule: its public names
    'centralized': ('LR_SCHEDULES', 'CentralizedConfig', 'resolve_device', 'run_centralized'),
    'cli': ('main',),
    'flower_runtime': ('ROOT', 'RunFailed', 'alive', 'default_run_config', 'descendants', 'eval_beam_size',
                       'flower_env', 'flwr_run', 'free_port', 'local_superlink_ports', 'pump_output', 'run_status',
                       'stop_pids', 'stop_superlink', 'superlink_pids', 'toml_value', 'write_run_config'),
    'pretrain': ('CACHE_FORMAT', 'NO_BUDGET', 'PRETRAIN_DEFAULTS', 'cached_pretrain', 'pretrain_config',
                 'run_pretrain', 'settings_hash'),
    'progress': ('Progress', 'RoundLines', 'duration', 'estimate'),
    'sources': ('SOURCES', 'evaluation_data', 'load_folder_splits', 'training_data'),
    'vocab_cmd': ('VOCAB_EXIT_CODES', 'add_vocab_parser', 'run_vocab'),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
