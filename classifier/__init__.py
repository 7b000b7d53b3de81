"""Stage 2: the independent mitosis classifier ensemble (train, score, evaluate)."""
