"""Reranking beams with a retrieval model (evaluate's rerank_k): weight 0 keeps the beam's
choice, a large weight picks the candidate the retrieval model likes best."""

import torch

from captionflow.config import build
from captionflow.data.captions import SplitData
from captionflow.decoding.search import beam_candidates, beam_search, until_end
from captionflow.evaluation import captioning as stage
from captionflow.evaluation.captioning import DecodingConfig
from captionflow.evaluation.retrieval import load_retrieval
from captionflow.models import create_model
from captionflow.training import retrieval
from captionflow.training.retrieval import RetrievalConfig


def test_beam_candidates_are_ranked_and_the_first_is_beam_search():
    torch.manual_seed(0)
    model = create_model("fc", vocab_size=20, feat_dim=12, embed_size=8, hidden_size=16).eval()
    feats = {"att": torch.randn(3, 4, 12), "fc": torch.randn(3, 12)}
    seqs, scores = beam_candidates(model, feats, beam_size=4, max_len=6)
    best, best_score = beam_search(model, feats, beam_size=4, max_len=6)
    assert seqs.shape[:2] == (3, 4) and torch.equal(seqs[:, 0], best) and torch.equal(scores[:, 0], best_score)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_rerank_weight_zero_keeps_the_beam_and_a_large_weight_follows_the_affinity(tiny_data, tmp_path):
    d = tiny_data
    retrieval.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        tmp_path / "r.pt",
        tmp_path / "r.tsv",
        build(RetrievalConfig, model_args={"embed_size": 16, "hidden_size": 16, "units": 16}, epochs=1, device="cpu"),
    )
    data = SplitData(d / "labels.h5", d / "labels.json", d / "test.h5", "test")
    torch.manual_seed(0)
    model = create_model(
        "fc", vocab_size=data.vocab_size, feat_dim=data.features.feat_dim, embed_size=8, hidden_size=16
    ).eval()
    device = torch.device("cpu")
    ret_model, _ = load_retrieval(tmp_path / "r.pt")
    feats = data.features.get(range(len(data.image_ids)))
    plain = stage._reranked(
        model, data, device, build(DecodingConfig, beam_size=4, rerank_k=4, rerank_weight=0.0), ret_model, feats["fc"]
    )
    best, _ = beam_search(model, feats, beam_size=4, max_len=16)
    from captionflow.decoding.search import to_words

    assert list(plain.values()) == to_words(best, data.ix_to_word)
    heavy = stage._reranked(
        model, data, device, build(DecodingConfig, beam_size=4, rerank_k=4, rerank_weight=1e6), ret_model, feats["fc"]
    )
    seqs, _ = beam_candidates(model, feats, beam_size=4, max_len=16)
    for row, image_id in enumerate(data.image_ids):
        words = until_end(seqs[row])
        lengths = torch.tensor([max(1, len(w)) for w in words])
        tokens = torch.zeros(4, int(lengths.max()), dtype=torch.long)
        for i, w in enumerate(words):
            tokens[i, : len(w)] = torch.tensor(w, dtype=torch.long)
        with torch.no_grad():
            affinity = ret_model(tokens, lengths, feats["fc"][row : row + 1].repeat(4, 1))
        assert heavy[image_id] == to_words(seqs[row, int(affinity.argmax())][None], data.ix_to_word)[0]
