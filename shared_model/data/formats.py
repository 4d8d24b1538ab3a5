"""The caption-folder formats FedCap reads (shared_model/data/loaders.py reads each; the settings
schema checks names against this list without importing PIL)."""

FORMATS = ("coco", "karpathy", "csv", "jsonl")
