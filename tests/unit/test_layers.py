"""The shared layers (captionflow/layers): attention against torch's reference, the key/value
cache against recomputing the prefix, and every model built on them."""

import pytest
import torch

from captionflow.layers import CausalSelfAttention, MultiHeadAttention
from captionflow.models import MODELS, create_model


def _reference(ours):
    """torch.nn.MultiheadAttention holding the same weights as `ours`."""
    d = ours.query.in_features
    ref = torch.nn.MultiheadAttention(d, ours.n_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.query.weight, ours.key.weight, ours.value.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.query.bias, ours.key.bias, ours.value.bias]))
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    return ref.eval()


def test_attention_with_a_region_mask_equals_torch_reference():
    torch.manual_seed(0)
    ours = MultiHeadAttention(8, 2, dropout=0.0).eval()
    x, mem = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    expected, _ = _reference(ours)(x, mem, mem, key_padding_mask=~mask)
    got = ours(x, *ours.project_kv(mem), mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the mask matters: without it the padded regions change the result
    assert not torch.allclose(ours(x, *ours.project_kv(mem)), expected, atol=1e-3)


def test_causal_self_attention_equals_torch_reference():
    torch.manual_seed(0)
    ours = MultiHeadAttention(8, 2, dropout=0.0).eval()
    x = torch.randn(2, 6, 8)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    expected, _ = _reference(ours)(x, x, x, attn_mask=causal)
    torch.testing.assert_close(ours.self_attend(x, causal=True), expected, atol=1e-5, rtol=1e-5)


def test_without_output_projection_the_heads_stay_concatenated():
    torch.manual_seed(0)
    full = MultiHeadAttention(8, 2, dropout=0.0).eval()
    bare = MultiHeadAttention(8, 2, dropout=0.0, out_proj=False).eval()
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("out.")})
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(full.out(bare.self_attend(x)), full.self_attend(x))
    assert sum(p.numel() for p in bare.parameters()) == 3 * (8 * 8 + 8)


def test_key_value_cache_equals_recomputing_the_prefix():
    torch.manual_seed(0)
    layer = CausalSelfAttention(8, 2, dropout=0.0).eval()
    x = torch.randn(2, 5, 8)
    full = layer(x)
    cache = {"k": x.new_zeros(2, 0, 8), "v": x.new_zeros(2, 0, 8)}
    steps = []
    for t in range(5):
        out, new = layer.extend(x[:, t : t + 1], cache)
        cache = {name: torch.cat([cache[name], new[name]], dim=1) for name in cache}
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_attention_of_a_model_is_a_shared_layer(name):
    model = create_model(name, vocab_size=7, feat_dim=12, embed_size=8, hidden_size=16)
    attention = [type(m) for m in model.modules() if "Attention" in type(m).__name__]
    assert all(cls.__module__.startswith("captionflow.layers.") for cls in attention), attention
