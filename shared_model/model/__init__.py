"""The captioner: its config, DP-compatible layers, encoders, the model with one decoder step,
decoding, checkpoints and the training loop."""
