"""Training regimes, one module each (xe, e2e, scst), and what they share: the resumable
run (loop), checkpoints, schedules, losses, batching, validation and torchrun helpers.
A regime never imports another."""
