"""Batched retrieval metrics (R@k, mAP) with identity-aware matching, for text-image search.

A gallery item matches a query when their ids are equal. With one id per image and the
image's id on each of its captions this is plain caption-image retrieval; with person
identities (CUHK-PEDES, Li et al. 2017) every image of the queried person is a match, the
protocol person-search papers report.

    R@k   percentage of queries with at least one match among the top k
    mAP   mean over queries of the average precision over all of the query's matches:
          AP = (1 / #matches) * sum over matches m of (matches ranked <= m) / rank(m)

Ties: gallery items are ranked by score, highest first; among equal scores every
non-match ranks before every match ("pessimistic" ties). So a tie never raises a score,
and the result does not depend on the order of the gallery: a model that gives every
item the same score gets the worst rank for every match, not whatever the gallery order
happens to hand it.

Every query must have at least one match in the gallery: a query without one is refused
(CaptionflowError), since it has no defined AP and excluding it silently would move the
figures; it usually means the queries and the gallery come from different splits.

One sort per block of queries, then cumulative sums; no Python loop over pairs. Queries
are taken `chunk` at a time so the (chunk, G) temporaries stay small.
"""

import torch

from captionflow.errors import CaptionflowError


def retrieval_metrics(scores, query_ids, gallery_ids, ks=(1, 5, 10), chunk=1024):
    """R@k and mAP, in percent, of ranking the gallery for each query.

    scores (Q, G), higher = more similar; query_ids (Q,), gallery_ids (G,) integer ids
    (tensors or sequences). -> {"R@1": %, "R@5": %, "R@10": %, "mAP": %} (one R@k per k).
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty (queries, gallery) matrix, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"scores hold {int(torch.isnan(scores).sum())} NaN values; NaN has no rank")
    n_queries, n_gallery = scores.shape
    query_ids = _ids(query_ids, n_queries, "query_ids", scores.device)
    gallery_ids = _ids(gallery_ids, n_gallery, "gallery_ids", scores.device)
    first_rank = torch.empty(n_queries, dtype=torch.long, device=scores.device)
    average_precision = torch.empty(n_queries, dtype=torch.float64, device=scores.device)
    n_matches = torch.empty(n_queries, dtype=torch.long, device=scores.device)
    for start in range(0, n_queries, chunk):
        block = slice(start, start + chunk)
        match = query_ids[block, None] == gallery_ids[None, :]  # (B, G)
        first_rank[block], average_precision[block], n_matches[block] = _rank_matches(scores[block], match)
    unmatched = (n_matches == 0).nonzero().flatten()
    if len(unmatched):
        q = int(unmatched[0])
        raise CaptionflowError(
            f"retrieval: {len(unmatched)} of {n_queries} queries have no gallery item with their id "
            f"(first: query {q}, id {int(query_ids[q])}); every query needs a match: "
            "take the queries and the gallery from the same split"
        )
    metrics = {f"R@{k}": 100.0 * (first_rank <= k).double().mean().item() for k in ks}
    metrics["mAP"] = 100.0 * average_precision.mean().item()
    return metrics


def both_directions(scores_text_image, text_ids, image_ids, ks=(1, 5, 10), chunk=1024):
    """Text-to-image and image-to-text metrics of one (T, I) text-image score matrix.

    -> {"text_to_image": {...}, "image_to_text": {...}}: the same call with the roles of
    queries and gallery swapped (the transposed scores).
    """
    scores = torch.as_tensor(scores_text_image)
    return {
        "text_to_image": retrieval_metrics(scores, text_ids, image_ids, ks, chunk),
        "image_to_text": retrieval_metrics(scores.T, image_ids, text_ids, ks, chunk),
    }


def _ids(ids, n, name, device):
    ids = torch.as_tensor(ids, device=device)
    if ids.shape != (n,) or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must be {n} integer ids, got {ids.dtype} of shape {tuple(ids.shape)}")
    return ids


def _rank_matches(scores, match):
    """Pessimistic-tie ranks of a block of queries.

    scores (B, G), match (B, G) bool -> first match's 1-based rank (B,) (G + 1 when none),
    average precision (B,) float64 (0 when none), number of matches (B,).
    """
    sorted_scores, order = scores.sort(dim=1, descending=True)
    hit = match.gather(1, order)  # (B, G) matches in score order; ties in any order for now
    hits_so_far = hit.cumsum(1)
    misses_so_far = (~hit).cumsum(1)
    # The last position of each run of equal scores: where the next score differs (or the end).
    n_gallery = scores.shape[1]
    position = torch.arange(n_gallery, device=scores.device).expand_as(hit)
    run_end = torch.ones_like(hit)
    run_end[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    run_last = torch.where(run_end, position, n_gallery).flip(1).cummin(1).values.flip(1)
    # A match is ranked after every non-match scoring at least as high (its whole tie run)
    # and after the matches before it; matches are interchangeable, so their own order
    # within a tie changes nothing.
    rank = misses_so_far.gather(1, run_last) + hits_so_far  # (B, G), meaningful where hit
    n_matches = hits_so_far[:, -1]
    precision = torch.where(hit, hits_so_far.double() / rank.double(), 0.0)
    average_precision = precision.sum(1) / n_matches.clamp(min=1).double()
    first_rank = torch.where(hit, rank, n_gallery + 1).min(1).values
    return first_rank, average_precision, n_matches
