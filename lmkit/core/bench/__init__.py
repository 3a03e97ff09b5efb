"""``lmkit bench``: every harness measures side by side in one process, so ratios are
trustworthy on a shared machine (one module per harness: train, eval, pack, sample)."""
