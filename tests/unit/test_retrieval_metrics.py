"""Identity-aware R@k and mAP: a hand-computed example, a control, ties, and the batched
code against a plain per-query loop."""

import pytest
import torch

from captionflow.errors import CaptionflowError
from captionflow.metrics.retrieval import both_directions, retrieval_metrics

# Gallery of 5 images; identity 1 has two of them (g0, g1).
GALLERY_IDS = [1, 1, 2, 3, 4]
QUERY_IDS = [1, 2, 3, 1]
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.3, 0.2],  # q0 id 1: order g0* g2 g3 g4 g1*  -> matches at ranks 1, 5
        [0.7, 0.6, 0.5, 0.4, 0.3],  # q1 id 2: order g0 g1 g2*          -> match at rank 3
        [0.2, 0.9, 0.1, 0.8, 0.7],  # q2 id 3: order g1 g3*             -> match at rank 2
        [0.3, 0.9, 0.2, 0.5, 0.4],  # q3 id 1: order g1* g3 g4 g0* g2   -> matches at ranks 1, 4
    ]
)


def test_identity_aware_metrics_by_hand():
    # first-match ranks: 1, 3, 2, 1
    #   R@1 = 2/4 = 50 %   R@2 = 3/4 = 75 %   R@5 = 4/4 = 100 %
    # AP: q0 (1/1 + 2/5) / 2 = 0.7;  q1 1/3;  q2 1/2;  q3 (1/1 + 2/4) / 2 = 0.75
    #   mAP = (0.7 + 1/3 + 0.5 + 0.75) / 4 = 2.28333... / 4 = 57.0833 %
    got = retrieval_metrics(SCORES, QUERY_IDS, GALLERY_IDS, ks=(1, 2, 5))
    assert got == pytest.approx({"R@1": 50.0, "R@2": 75.0, "R@5": 100.0, "mAP": 57.083333333})


def test_control_matching_by_index_changes_the_result():
    # Query i matches only gallery item i (identity ignored). q3 now matches g3 (rank 2), not
    # its top-1 g1, so R@1 falls: first ranks 1 (g0), 2 (g1), 5 (g2), 2 (g3) -> R@1 = 25 %;
    # AP = (1 + 1/2 + 1/5 + 1/2) / 4 = 55 %.
    by_index = retrieval_metrics(SCORES, [0, 1, 2, 3], [0, 1, 2, 3, 4], ks=(1, 2, 5))
    assert by_index == pytest.approx({"R@1": 25.0, "R@2": 75.0, "R@5": 100.0, "mAP": 55.0})
    assert by_index["R@1"] != retrieval_metrics(SCORES, QUERY_IDS, GALLERY_IDS, ks=(1,))["R@1"]


def test_ties_rank_non_matches_first_and_do_not_depend_on_gallery_order():
    # All scores equal: the one match of id 1 ranks after both non-matches -> rank 3, AP 1/3.
    flat = retrieval_metrics(torch.zeros(1, 3), [1], [1, 2, 3], ks=(1, 3))
    assert flat == pytest.approx({"R@1": 0.0, "R@3": 100.0, "mAP": 100 / 3})
    # g1 (0.9) misses; g0, g2, g3 tie at 0.5 and the miss g2 goes first: order g1 g2 g0* g3*,
    # matches at ranks 3 and 4 -> AP = (1/3 + 2/4) / 2
    tied = retrieval_metrics(torch.tensor([[0.5, 0.9, 0.5, 0.5]]), [7], [7, 1, 2, 7], ks=(2, 3))
    assert tied == pytest.approx({"R@2": 0.0, "R@3": 100.0, "mAP": 100 * (1 / 3 + 2 / 4) / 2})
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    rounded = (SCORES * 2).round()  # many ties
    gallery = torch.tensor(GALLERY_IDS)
    shuffled = retrieval_metrics(rounded[:, perm], QUERY_IDS, gallery[perm])
    assert shuffled == pytest.approx(retrieval_metrics(rounded, QUERY_IDS, gallery))


def _naive(scores, query_ids, gallery_ids, ks):
    """One query at a time in plain Python: sort by (score desc, match first-last)."""
    recall, aps = {k: 0 for k in ks}, []
    for q, row in enumerate(scores.tolist()):
        matches = [g == query_ids[q] for g in gallery_ids]
        order = sorted(range(len(row)), key=lambda g: (-row[g], matches[g]))
        ranks = [r + 1 for r, g in enumerate(order) if matches[g]]
        for k in ks:
            recall[k] += ranks[0] <= k
        aps.append(sum((n + 1) / r for n, r in enumerate(ranks)) / len(ranks))
    out = {f"R@{k}": 100 * recall[k] / len(scores) for k in ks}
    out["mAP"] = 100 * sum(aps) / len(aps)
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_batched_equals_a_per_query_loop(ties):
    gen = torch.Generator().manual_seed(3)
    gallery_ids = torch.randint(0, 9, (41,), generator=gen)
    query_ids = gallery_ids[torch.randint(0, 41, (53,), generator=gen)]  # every query has a match
    scores = torch.randn(53, 41, generator=gen)
    if ties:
        scores = scores.round()  # a handful of distinct values: ties everywhere
    ks = (1, 2, 5, 10, 50)
    want = _naive(scores, query_ids.tolist(), gallery_ids.tolist(), ks)
    got = retrieval_metrics(scores, query_ids, gallery_ids, ks=ks, chunk=7)  # several blocks
    assert got == pytest.approx(want, abs=1e-9)


def test_both_directions_swaps_the_roles():
    image_ids = torch.tensor([10, 11, 12])
    text_ids = torch.tensor([10, 10, 11, 11, 12, 12])  # two captions per image
    scores = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    both = both_directions(scores, text_ids, image_ids, ks=(1,))
    assert both["text_to_image"] == retrieval_metrics(scores, text_ids, image_ids, ks=(1,))
    assert both["image_to_text"] == retrieval_metrics(scores.T, image_ids, text_ids, ks=(1,))
    aligned = torch.eye(3).repeat_interleave(2, dim=0)  # each caption scores its own image highest
    assert both_directions(aligned, text_ids, image_ids, ks=(1,)) == {
        "text_to_image": {"R@1": 100.0, "mAP": 100.0},
        "image_to_text": {"R@1": 100.0, "mAP": 100.0},
    }


def test_a_query_without_a_match_is_refused_in_one_line():
    with pytest.raises(CaptionflowError) as err:
        retrieval_metrics(SCORES, [1, 2, 9, 8], GALLERY_IDS)
    message = str(err.value)
    assert "2 of 4 queries have no gallery item with their id (first: query 2, id 9)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "scores, query_ids, expected",
    [
        (torch.zeros(4), QUERY_IDS, "non-empty (queries, gallery) matrix"),
        (torch.full((4, 5), float("nan")), QUERY_IDS, "NaN"),
        (SCORES, [1, 2, 3], "query_ids must be 4 integer ids"),
        (SCORES, [1.0, 2.0, 3.0, 1.0], "query_ids must be 4 integer ids"),
    ],
)
def test_wrong_arguments(scores, query_ids, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        retrieval_metrics(scores, query_ids, GALLERY_IDS)
