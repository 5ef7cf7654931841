"""Training regimes, one per module (xe, and later scst, e2e, es), plus shared pieces."""
