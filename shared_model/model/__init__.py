"""The captioner: its config, DP-compatible layers, encoders, the model with one decoder step,
decoding, checkpoints and the training loop.

Names resolve lazily (shared_model/lazy.py): importing the wing imports no heavy library."""

from shared_model.lazy import lazy_exports

_MODULES = {  # submodule: its public names
    'captioner': ('CaptionLoss', 'Captioner', 'caption_loss'),
    'checkpoint': ('checkpoint_sha256', 'load_checkpoint', 'model_state', 'save_checkpoint'),
    'config': ('BATCHNORM_ENCODERS', 'DECODERS', 'ENCODERS', 'FUSIONS', 'RUN_CONFIG_KEYS', 'TRAINING_ONLY', 'CaptionerConfig',
               'captioner_config_from_run_config', 'check_same_model'),
    'decoding': ('beam_search', 'greedy_decode'),
    'encoders': ('TORCHVISION', 'build_encoder', 'load_resnet18_backbone', 'load_torchvision_backbone'),
    'layers': ('LSTM', 'MultiHeadAttention', 'TransformerDecoderLayer', 'sinusoidal_positions',
               'sinusoidal_positions_2d'),
    'trainable': ('TRAINABLE', 'check_trainable', 'parameter_group', 'set_trainable'),
    'precision': ('PRECISIONS', 'check_precision', 'resolve_precision'),
    'training': ('float32_grad_samples', 'is_ghost', 'noise_only_step', 'pad_batch', 'train_epoch', 'training_loss'),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
