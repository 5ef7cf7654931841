"""GNA-RNN as published (Li et al. 2017) beside its factorised variant and the dual encoder:
the published network's logit on a hand-built example, batched gallery scoring equal to
per-pair scoring, the factorised model's logits unchanged by the rename, the registry
names, and the refusal of a factorised checkpoint saved under the old name."""

import math

import pytest
import torch

from captionflow.errors import CaptionflowError
from captionflow.evaluation.retrieval import load_retrieval
from captionflow.models import checkpoint
from captionflow.models.retrieval import RETRIEVAL, create_retrieval_model


def _sig(z):
    return 1 / (1 + math.exp(-z))


def _published_by_hand():
    """One image (fc = [1, 2]), two words; sizes 1 (word, image embedding, LSTM) and 2 units."""
    m = create_retrieval_model(
        "gna_rnn", vocab_size=2, feat_dim=2, embed_size=1, image_embed_size=1, hidden_size=1, units=2, dropout=0.5
    )
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for bn in (m.image_embed[1], m.visual[1]):  # eval-mode BatchNorm: (x - 0) / sqrt(1 - eps + eps) * 1 + 0
            bn.running_mean.zero_()
            bn.running_var.fill_(1 - bn.eps)
            bn.weight.fill_(1.0)
        m.embed.weight[1, 0], m.embed.weight[2, 0] = 0.5, -1.0  # words 1, 2
        m.image_embed[0].weight.copy_(torch.tensor([[1.0, -0.25]]))  # 1 - 0.5 = 0.5 -> ReLU 0.5
        m.image_embed[3].weight.fill_(2.0)  # e = 1.0
        m.image_embed[3].bias.fill_(0.0)
        m.visual[0].weight.copy_(torch.tensor([[0.5, 0.5]]))  # 1.5 -> ReLU 1.5
        m.visual[3].weight.copy_(torch.tensor([[1.0], [-2.0]]))
        m.visual[3].bias.copy_(torch.tensor([0.5, 0.0]))  # v = [2.0, -3.0]
        # LSTM rows i, f, g, o; columns [word ; image]
        m.lstm.weight_ih_l0.copy_(torch.tensor([[1.0, 0.5], [0.2, 0.1], [2.0, -1.0], [0.3, 0.3]]))
        m.lstm.weight_hh_l0.copy_(torch.tensor([[0.4], [0.6], [-0.5], [1.0]]))
        m.lstm.bias_ih_l0.copy_(torch.tensor([0.1, 0.0, 0.0, 0.0]))
        m.lstm.bias_hh_l0.copy_(torch.tensor([0.0, 0.2, 0.0, -0.1]))
        m.attention.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        m.attention.bias.copy_(torch.tensor([0.0, 0.3]))
        m.gate.weight.fill_(1.5)
        m.gate.bias.fill_(-0.5)
        m.bias.fill_(0.25)
    return m.eval()


def _expected_by_hand():
    # the paper's equations, written out for one image and the words x = 0.5, -1.0
    e, v = 1.0, (2.0, -3.0)
    h = c = 0.0
    total = 0.0
    for x in (0.5, -1.0):
        i = _sig(1.0 * x + 0.5 * e + 0.4 * h + 0.1)
        f = _sig(0.2 * x + 0.1 * e + 0.6 * h + 0.2)
        g = math.tanh(2.0 * x - 1.0 * e - 0.5 * h)
        o = _sig(0.3 * x + 0.3 * e + 1.0 * h - 0.1)
        c = f * c + i * g
        h = o * math.tanh(c)
        z = (2.0 * h, -1.0 * h + 0.3)
        a = [math.exp(k) / (math.exp(z[0]) + math.exp(z[1])) for k in z]
        total += _sig(1.5 * h - 0.5) * (a[0] * v[0] + a[1] * v[1])
    return total + 0.25


def test_published_gna_rnn_computes_the_papers_affinity_on_a_hand_built_example():
    m = _published_by_hand()
    tokens, lengths, fc = torch.tensor([[1, 2, 0]]), torch.tensor([2]), torch.tensor([[1.0, 2.0]])
    expected = _expected_by_hand()
    with torch.no_grad():
        assert m(tokens, lengths, fc).item() == pytest.approx(expected, abs=1e-6)
        assert m.score_gallery(tokens, lengths, fc).item() == pytest.approx(expected, abs=1e-6)
    # the third word is padding: a third real word would change the logit
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 1]]), torch.tensor([3]), fc).item() != pytest.approx(expected, abs=1e-4)


def _inputs():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 21, (5, 7), generator=g)
    lengths = torch.tensor([7, 5, 3, 1, 4])
    tokens[torch.arange(7)[None] >= lengths[:, None]] = 0
    return tokens, lengths, torch.randn(4, 12, generator=g)


@pytest.mark.parametrize("name", ["gna_rnn", "gna_rnn_factorised", "dual_encoder"])
def test_gallery_scoring_equals_per_pair_scoring(name):
    torch.manual_seed(0)
    args = {"embed_size": 8, "units": 6, **({} if name == "dual_encoder" else {"hidden_size": 10})}
    if name == "gna_rnn":
        args.update(image_embed_size=5, pair_budget=8)
    model = create_retrieval_model(name, vocab_size=20, feat_dim=12, **args)
    model.train()
    tokens, lengths, fc = _inputs()
    model(tokens[:4], lengths[:4], fc)  # a training step's BatchNorm statistics, so eval mode has some
    model.eval()
    with torch.no_grad():
        grid = model.score_gallery(tokens, lengths, fc)  # gna_rnn: pair_budget 8, chunks of 2 texts x 4 images
        assert grid.shape == (5, 4)
        for t in range(5):
            for i in range(4):
                one = model(tokens[t : t + 1], lengths[t : t + 1], fc[i : i + 1])
                assert one[0].item() == pytest.approx(grid[t, i].item(), abs=1e-5)
        index = torch.tensor([[3, 0], [1, 1], [2, 0], [0, 3], [1, 2]])
        pairs = model.score_pairs(tokens, lengths, fc, index)
        assert torch.allclose(pairs, grid.gather(1, index), atol=1e-5)
        padded = torch.cat([tokens, torch.zeros(5, 3, dtype=torch.long)], dim=1)  # padding changes nothing
        assert torch.allclose(model.score_gallery(padded, lengths, fc), grid, atol=1e-6)


def test_the_factorised_model_gives_the_logits_it_gave_as_gna_rnn():
    # pinned with the code before the rename (registry name gna_rnn), same seed and inputs
    torch.manual_seed(0)
    m = create_retrieval_model(
        "gna_rnn_factorised", vocab_size=20, feat_dim=12, embed_size=8, units=6, hidden_size=10
    ).eval()
    tokens, lengths = torch.tensor([[3, 5, 7, 0], [2, 9, 0, 0]]), torch.tensor([3, 2])
    fc = torch.linspace(-1, 1, 36).view(3, 12)
    pinned = torch.tensor(
        [
            [0.21214091777801514, 0.11970659345388412, 0.027272313833236694],
            [0.17216330766677856, 0.06043102592229843, -0.051301248371601105],
        ]
    )
    with torch.no_grad():
        assert torch.allclose(m.score_gallery(tokens, lengths, fc), pinned, atol=1e-6)


def test_registry_names():
    assert set(RETRIEVAL.classes) == {"gna_rnn", "gna_rnn_factorised", "dual_encoder"}
    published = create_retrieval_model(
        "gna_rnn", vocab_size=5, feat_dim=4, embed_size=3, image_embed_size=2, hidden_size=4, units=2
    )
    assert published.lstm.input_size == 3 + 2  # [word ; image embedding]: the LSTM reads the image
    factorised = create_retrieval_model(
        "gna_rnn_factorised", vocab_size=5, feat_dim=4, embed_size=3, hidden_size=4, units=2
    )
    assert factorised.lstm.input_size == 3
    tied = create_retrieval_model("gna_rnn", vocab_size=5, feat_dim=4, embed_size=3, hidden_size=4, units=2)
    assert tied.lstm.input_size == 3 + 3  # image_embed_size unset: the word embedding's size, as the source
    with pytest.raises(CaptionflowError, match="option image_embed_size: 0 must be a positive integer or null"):
        create_retrieval_model("gna_rnn", vocab_size=5, feat_dim=4, image_embed_size=0)


def test_a_factorised_checkpoint_saved_as_gna_rnn_is_refused_in_one_line(tmp_path):
    args = {"vocab_size": 5, "feat_dim": 4, "embed_size": 3, "hidden_size": 4, "units": 2}
    old = create_retrieval_model("gna_rnn_factorised", **args)
    meta = {"stage": "retrieval", "model_args": args, "model": old.state_dict()}
    checkpoint.save({**meta, "model_name": "gna_rnn"}, tmp_path / "old.pt")  # before issue 28
    with pytest.raises(CaptionflowError, match="now named gna_rnn_factorised"):
        load_retrieval(tmp_path / "old.pt")
    checkpoint.save({**meta, "model_name": "gna_rnn_factorised"}, tmp_path / "renamed.pt")
    assert isinstance(load_retrieval(tmp_path / "renamed.pt")[0], type(old))
    new = create_retrieval_model("gna_rnn", **args)
    checkpoint.save(
        {**meta, "model": new.state_dict(), "model_name": "gna_rnn", **new.CHECKPOINT_TAG}, tmp_path / "new.pt"
    )
    assert isinstance(load_retrieval(tmp_path / "new.pt")[0], type(new))
