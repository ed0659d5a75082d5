"""Train-time analyses: gradient statistics (paper Fig. 5) and result figures (Fig. 3, 6, 7)."""
