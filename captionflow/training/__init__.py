"""Training regimes, one module each (xe, e2e, scst, scst_e2e, es, retrieval), and what they
share: the resumable run (loop), schedules, losses, batching, self-critical rewards, the
end-to-end image side (from_images) and torchrun helpers. A regime never imports another;
checkpoints live in captionflow.models.checkpoint and validation's decoding in
captionflow.evaluation."""
