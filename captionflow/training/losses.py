"""Losses every training regime may use."""


def smoothed_nll(logprobs, targets, mask, smoothing):
    """Label-smoothed NLL averaged over unmasked tokens. logprobs (B, T, V), targets/mask (B, T)."""
    nll = -logprobs.gather(2, targets[..., None]).squeeze(2)
    uniform = -logprobs.mean(dim=2)
    loss = (1.0 - smoothing) * nll + smoothing * uniform
    return (loss * mask).sum() / mask.sum()
