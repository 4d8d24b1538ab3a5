"""Records and where they come from: the record set (in memory, or on disk: rows, store), vocabulary,
the embedded synthetic scenes, feature skew, partitioners, folder loaders and torch datasets.

Names resolve lazily (shared_model/lazy.py): importing the wing imports no heavy library."""

from shared_model.lazy import lazy_exports

_MODULES = {  # submodule: its public names
    'checks': ('check_int',),
    'datasets': ('CaptionDataset', 'CaptionPairs', 'encode_captions', 'image_tensor'),
    'loaders': ('FOLDER_FILES', 'FORMATS', 'IMAGE_COLUMNS', 'KARPATHY_SPLITS', 'CaptionDataError',
                'ParsedRecords', 'load_caption_table', 'load_coco_captions', 'load_dataset', 'load_dataset_folder',
                'load_images', 'load_karpathy', 'parse_dataset', 'parse_dataset_folder'),
    'partition': ('METHODS', 'dirichlet_label_partition', 'hash_split', 'iid_partition', 'partition_caption_set',
                  'quantity_skew_partition'),
    'public': ('PUBLIC_CAMERA', 'PUBLIC_SIZE', 'PUBLIC_STREAM', 'load_public', 'public_camera', 'public_seed'),
    'records': ('CaptionSet', 'SkippedRecord'),
    'rows': ('ImageFile', 'ImageRows'),
    'store': ('STORE_FORMAT', 'StoreError', 'available_cores', 'build_store', 'open_store', 'store_paths',
              'write_store'),
    'skew': ('SKEW_KINDS', 'apply_feature_skew', 'site_feature_skews'),
    'synthetic': ('COLOURS', 'LABEL_ATTRIBUTES', 'MIN_IMAGE_SIZE', 'SHAPES', 'SIZES', 'SPLITS', 'generate_scenes',
                  'load_embedded', 'split_seed', 'synthetic_vocabulary'),
    'vocab': ('SPECIALS', 'Vocabulary', 'tokenize'),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
