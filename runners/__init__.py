"""Programs over the library: the `fedcap` CLI, centralized training and the Flower runtime helpers."""
