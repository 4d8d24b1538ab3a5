"""Caption metrics (pycocoevalcap), model evaluation, caption galleries and the canaries of the empirical
audit.

Names resolve lazily (shared_model/lazy.py): importing the wing imports no heavy library."""

from shared_model.lazy import lazy_exports

_MODULES = {  # submodule: its public names
    'canaries': ('CAPTION_WORDS', 'PATTERN_CELLS', 'append_records', 'canary_scores', 'draw_membership',
                 'included_canaries', 'make_canaries'),
    'gallery': ('GALLERY_SIZE', 'Gallery', 'write_gallery'),
    'evaluator': ('decoding', 'evaluate', 'generate_captions', 'mean_caption_loss'),
    'metrics': ('METRIC_NAMES', 'caption_metrics', 'trivial_baseline_predictions'),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
