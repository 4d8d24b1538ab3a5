"""Caption metrics (pycocoevalcap), model evaluation, caption galleries and the canaries of the empirical
audit."""
