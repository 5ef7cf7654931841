"""ONNX export: every registry model's encoder and decoding step on onnxruntime give PyTorch's
state and captions (greedy, beam search, sampling through the one search code), the images
graph with a backbone, float16, and the refusal of damaged or foreign exports."""

import json
import shutil

import pytest
import torch

from captionflow.decoding.search import beam_search, greedy, sample
from captionflow.deploy.onnx import DECODER, ENCODER, FORMAT_VERSION, MANIFEST, OnnxCaptioner, export_onnx
from captionflow.errors import CaptionflowError
from captionflow.features.backbones import GridFeatures, create_backbone
from captionflow.models import MODELS, create_model
from tests.unit.test_models import SMALL, WordsFirst

# 100 words and features of std 3: a random-init model's captions then differ between images
# (with 7 words and unit features most models give every image the same caption)
V, D, R = 100, 12, 5
IMAGES, WORDS, MAX_LEN = 10, 3, 12  # images per batch, words before the end may come, steps
TIE = 1e-4


def _model(name, feat_dim=D):
    torch.manual_seed(0)
    kw = {"embed_size": 16, "hidden_size": 32, "dropout": 0.0, **SMALL.get(name, {})}
    return create_model(name, vocab_size=V, feat_dim=feat_dim, **kw).eval()


def _feats(masked, b=IMAGES, seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = {"att": 3 * torch.randn(b, R, D, generator=g), "fc": 3 * torch.randn(b, D, generator=g)}
    if masked:  # region features of 5, 4 and 3 boxes, padded with garbage the mask hides
        feats["att_mask"] = torch.arange(R)[None] < torch.tensor([5, 4, 3] * b)[:b, None]
        feats["att"] = feats["att"].masked_fill(~feats["att_mask"][..., None], 1e4)
    return feats


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(name, masked) -> (torch model, its OnnxCaptioner): each model exported once per variant."""
    cache = {}

    def get(name, masked=False):
        if (name, masked) not in cache:
            model = _model(name)
            folder = export_onnx(model, tmp_path_factory.mktemp(f"{name}_{masked}"), masked=masked)
            cache[name, masked] = model, OnnxCaptioner(folder)
        return cache[name, masked]

    return get


def _close(a, b, atol=TIE):
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["grid", "masked"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_encoder_gives_the_init_state_of_pytorch(exports, name, masked):
    model, onnx = exports(name, masked)
    for b in (1, IMAGES):  # dynamic batch; another region count than the export's example
        feats = _feats(masked, b)
        with torch.no_grad():
            want = model.init_state(feats)
        got = onnx.init_state(feats)
        assert sorted(got) == sorted(want)
        assert all(_close(got[k], want[k]) for k in want), [k for k in want if not _close(got[k], want[k])]
    state = onnx.init_state(_feats(masked))
    assert any(v.is_floating_point() and v.std() > 0.1 for v in state.values())  # not all zeros


def _words(seqs):
    return [[w for w in row if w] for row in seqs.tolist()]


def _first_difference_is_a_tie(models, feats, a, b):
    """Greedy: at the first step where word lists a and b differ, both models' two best
    log-probabilities are within TIE (so either pick is right)."""
    t = next(i for i, (x, y) in enumerate(zip(a + [0], b + [0])) if x != y)
    for model in models:
        state, tokens = model.init_state(feats), torch.zeros(1, dtype=torch.long)
        for word in a[:t]:
            _, state = model.step(tokens, state)
            tokens = torch.tensor([word])
        top = model.step(tokens, state)[0][0].topk(2).values
        if top[0] - top[1] >= TIE:
            return False
    return True


def _score(model, feats, words, max_len):
    """Summed log-probability of `words` (then the end token, unless max_len cuts it)."""
    state, tokens, total = model.init_state(feats), torch.zeros(1, dtype=torch.long), 0.0
    for word in (words + [0])[:max_len]:
        logprobs, state = model.step(tokens, state)
        total += logprobs[0, word].item()
        tokens = torch.tensor([word])
    return total


def _decode(method, model, feats):
    if method == "greedy":
        return greedy(model, feats, max_len=MAX_LEN)[0]
    if method == "beam3":
        return beam_search(model, feats, beam_size=3, max_len=MAX_LEN)[0]
    return sample(model, feats, n=2, max_len=MAX_LEN, generator=torch.Generator().manual_seed(0))[0]


@pytest.mark.parametrize("masked", [False, True], ids=["grid", "masked"])
@pytest.mark.parametrize("method", ["greedy", "beam3", "sample"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_search_on_onnxruntime_gives_the_captions_of_pytorch(exports, name, method, masked):
    model, onnx = exports(name, masked)
    torch_model, onnx_model = WordsFirst(model, WORDS), WordsFirst(onnx, WORDS)
    feats = _feats(masked)
    want, got = _words(_decode(method, torch_model, feats)), _words(_decode(method, onnx_model, feats))
    assert all(len(words) >= WORDS for words in want + got)  # real captions are compared
    assert len({tuple(w) for w in want}) >= 3  # and they depend on the image
    differ = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
    assert len(differ) <= 0.1 * len(want), f"{len(differ)} of {len(want)} captions differ"
    for i in differ:  # what differs must be a tie that float rounding may break either way
        one = {k: v[i // (len(want) // IMAGES)][None] for k, v in feats.items()}
        with torch.no_grad():
            if method == "beam3":  # equally good beams: the search's own ranking ties
                gap = abs(_score(torch_model, one, want[i], MAX_LEN) - _score(torch_model, one, got[i], MAX_LEN))
                assert gap < TIE, f"image {i}: {want[i]} != {got[i]}, scores {gap:.2e} apart"
            elif method == "greedy":
                assert _first_difference_is_a_tie((torch_model, onnx_model), one, want[i], got[i]), (
                    f"image {i}: {want[i]} != {got[i]}"
                )


def test_a_cache_model_decodes_past_its_export_length_and_refuses_past_max_len(exports):
    # traced at a cache length of 2; ExpansionNet v2 has max_len learned positions
    model, onnx = exports("expansionnet_v2")
    feats = _feats(False, 2)
    long = model.max_len
    want = greedy(WordsFirst(model, long), feats, max_len=long)[0]
    got = greedy(WordsFirst(onnx, long), feats, max_len=long)[0]
    assert want.shape == (2, long) and torch.equal(want, got)
    with pytest.raises(CaptionflowError, match="max_len") as err:
        greedy(WordsFirst(onnx, long + 1), feats, max_len=long + 1)
    assert "\n" not in str(err.value)


def test_images_graph_runs_backbone_and_encoder_in_one(tmp_path):
    backbone = GridFeatures(create_backbone("resnet18", weights="none", seed=0)).eval()
    size = 128  # the demo's resize.size: a 4 x 4 grid of 512-d regions
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = _model("show_attend_tell", feat_dim=backbone.backbone.out_dim)
    with torch.no_grad():
        att, fc = backbone(images)  # unnormalised: a fitted norm would blow dead channels' rounding up 1000x
        want = model.init_state({"att": att, "fc": fc})
    onnx = OnnxCaptioner(export_onnx(model, tmp_path, encoder=backbone, image_size=size))
    assert onnx.manifest["encoder"]["inputs"] == ["images"]
    got = onnx.init_state({"images": images})
    assert sorted(got) == sorted(want)
    assert all(_close(got[k], want[k]) for k in want), [k for k in want if not _close(got[k], want[k])]
    assert want["att"].std() > 0.5  # real features, not a constant
    with pytest.raises(CaptionflowError, match="reads images"):  # the graph's size is fixed
        onnx.init_state(images[:, :, :64, :64])
    # the adapter's state decodes like PyTorch's through the one search
    torch_seqs = greedy(WordsFirst(model, WORDS), {"att": att, "fc": fc}, max_len=MAX_LEN)[0]
    onnx_seqs = greedy(WordsFirst(onnx, WORDS), {"images": images}, max_len=MAX_LEN)[0]
    assert torch.equal(torch_seqs, onnx_seqs)


def test_fp16_export_captions_agree_with_fp32(exports, tmp_path):
    model, fp32 = exports("transformer")
    try:
        fp16 = OnnxCaptioner(export_onnx(model, tmp_path, fp16=True))
    except CaptionflowError as exc:  # a graph onnxruntime's CPU cannot run in float16 is refused
        assert "transformer" in str(exc) and "\n" not in str(exc)
        pytest.skip(str(exc))
    assert fp16.manifest["dtype"] == "float16" and fp16.manifest["state"]["mem_k"] == "float16"
    feats = _feats(False)
    state = fp16.init_state(feats)
    assert state["mem_k"].dtype == torch.float16
    logprobs, _ = fp16.step(torch.zeros(IMAGES, dtype=torch.long), state)
    assert logprobs.dtype == torch.float32
    assert torch.allclose(
        logprobs, fp32.step(torch.zeros(IMAGES, dtype=torch.long), fp32.init_state(feats))[0], atol=0.05
    )
    want = _words(greedy(WordsFirst(fp32, WORDS), feats, max_len=MAX_LEN)[0])
    got = _words(greedy(WordsFirst(fp16, WORDS), feats, max_len=MAX_LEN)[0])
    assert len({tuple(w) for w in want}) >= 3
    # half precision may break a near-tie differently; most captions must agree
    assert sum(a == b for a, b in zip(want, got)) >= 0.7 * IMAGES


def _damage(folder, what):
    if what == "truncated decoder":
        data = (folder / DECODER).read_bytes()
        (folder / DECODER).write_bytes(data[: len(data) // 2])
    elif what == "missing encoder":
        (folder / ENCODER).unlink()
    elif what == "newer manifest":
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    elif what == "damaged manifest":
        (folder / MANIFEST).write_text('{"format": "captionflow-onnx", ')
    elif what == "swapped graphs":  # another model's decoder: its names do not match
        shutil.copy(folder.parent / "other" / DECODER, folder / DECODER)


@pytest.mark.parametrize(
    "what", ["truncated decoder", "missing encoder", "newer manifest", "damaged manifest", "swapped graphs"]
)
def test_a_damaged_or_foreign_export_is_refused_in_one_line(tmp_path, what):
    folder = export_onnx(_model("fc"), tmp_path / "export")
    export_onnx(_model("aoanet"), tmp_path / "other")
    OnnxCaptioner(folder)  # control: intact, it loads
    _damage(folder, what)
    with pytest.raises(CaptionflowError) as err:
        OnnxCaptioner(folder)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and str(folder) in message
    if what == "newer manifest":
        assert f"format version {FORMAT_VERSION + 1}" in message


def test_an_image_without_regions_is_refused(exports):
    _, onnx = exports("aoanet", True)
    feats = _feats(True, 2)
    feats["att_mask"][1] = False
    with pytest.raises(CaptionflowError, match="no real region"):
        onnx.init_state(feats)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_demo_test_split_decodes_alike_on_onnxruntime(small_demo, tmp_path, name):
    """The demo's own test features (50 images, resnet18 grids) and vocabulary, feature
    statistics fitted on its training split: greedy and beam 3 give PyTorch's captions for
    at least 99% of the images, every other one explained by a tie."""
    from captionflow.data.captions import SplitData

    test = SplitData(small_demo / "labels.h5", small_demo / "labels.json", small_demo / "test.h5", "test")
    train = SplitData(small_demo / "labels.h5", small_demo / "labels.json", small_demo / "train.h5", "train")
    torch.manual_seed(0)
    kw = {"embed_size": 16, "hidden_size": 32, "dropout": 0.0, **SMALL.get(name, {})}
    model = create_model(name, vocab_size=train.vocab_size, feat_dim=train.features.feat_dim, **kw).eval()
    model.fit_feature_norms(train.features.get(range(len(train.features))))
    feats = test.features.get(range(len(test.features)))
    onnx = OnnxCaptioner(export_onnx(model, tmp_path / "onnx"))
    with torch.no_grad():
        init = model.init_state(feats)
    got_state = onnx.init_state(feats)
    assert all(_close(got_state[k], init[k]) for k in init)
    torch_model, onnx_model = WordsFirst(model, WORDS), WordsFirst(onnx, WORDS)
    for method in ("greedy", "beam3"):
        want, got = _words(_decode(method, torch_model, feats)), _words(_decode(method, onnx_model, feats))
        # real words, not all one caption (a random-init transformer gives 2 distinct ones here)
        assert len({tuple(w) for w in want}) >= 2 and all(len(w) >= WORDS for w in want)
        differ = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
        for i in differ:
            one = {k: v[i][None] for k, v in feats.items()}
            with torch.no_grad():
                if method == "beam3":
                    assert (
                        abs(_score(torch_model, one, want[i], MAX_LEN) - _score(torch_model, one, got[i], MAX_LEN))
                        < TIE
                    )
                else:
                    assert _first_difference_is_a_tie((torch_model, onnx_model), one, want[i], got[i])
        assert len(differ) <= 0.01 * len(want), (
            f"{method}: {len(differ)} of {len(want)} captions differ"
        )  # ties above, and at most 1%
