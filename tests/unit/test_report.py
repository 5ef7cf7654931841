"""The report's figures and pages: attention recorded without changing a word, learning
curves per stage, the gallery, the metrics table's blind gap and the benchmark table."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from captionflow.decoding.search import greedy
from captionflow.errors import CaptionflowError
from captionflow.layers import MultiHeadAttention
from captionflow.models import MODELS
from captionflow.report import ATTENTION_MODELS
from captionflow.report.attention import greedy_attention, plot_attention
from captionflow.report.curves import plot_curves
from captionflow.report.gallery import write_gallery
from captionflow.report.tables import read_benchmarks, write_benchmarks_table, write_metrics_table
from tests.unit.test_models import WordsFirst, _feats, _model


def assert_png_shows_something(path, min_std=10.0):
    """The file decodes as an image and is not one flat colour."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.size > 100 * 100 and pixels.std() > min_std, f"{path} is blank (pixel std {pixels.std():.1f})"


def test_attention_models_are_the_models_that_name_an_attention_layer():
    assert set(ATTENTION_MODELS) <= set(MODELS)
    assert {name for name in MODELS if _model(name).attention_layer() is not None} == set(ATTENTION_MODELS)


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_recording_attention_changes_no_word_and_gives_a_distribution_per_word(name):
    model = _model(name)
    feats = _feats(3)
    forced = WordsFirst(model, 4)  # at least 4 real words per caption: something to compare
    forced.attention_layer = model.attention_layer
    plain, _ = greedy(forced, feats, max_len=8)
    tokens, weights = greedy_attention(forced, feats, max_len=8)
    assert torch.equal(tokens, plain) and (tokens[:, :4] != 0).all()
    assert weights.shape == (3, tokens.shape[1], feats["att"].shape[1])
    assert (weights >= 0).all() and torch.allclose(weights.sum(dim=-1), torch.ones(weights.shape[:2]), atol=1e-5)
    # the model looks at different regions for different images: the weights are the model's, not a constant
    assert not torch.allclose(weights[0, 0], weights[1, 0], atol=1e-4)
    # and each image's are its own: decoded alone, image 1 gets the same weights
    alone_tokens, alone = greedy_attention(forced, {k: v[1:2] for k, v in feats.items()}, max_len=8)
    steps = alone.shape[1]
    assert torch.equal(alone_tokens[0], tokens[1, :steps]) and torch.allclose(alone[0], weights[1, :steps], atol=1e-5)
    assert len(model._forward_hooks) == 0 and len(model.attention_layer()._forward_hooks) == 0  # removed again


def test_multi_head_weights_are_the_ones_forward_applies():
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=8, n_heads=2, dropout=0.0, out_proj=False).eval()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    keys, values = attention.project_kv(memory)
    weights = attention.weights(x, keys, mask)  # (B, h, T, S)
    heads = values.view(2, 5, 2, 4).transpose(1, 2)  # (B, h, S, d / h)
    by_hand = (weights @ heads).transpose(1, 2).reshape(2, 3, 8)
    assert torch.allclose(by_hand, attention(x, keys, values, mask=mask), atol=1e-6)
    assert (weights[1, :, :, 3:] == 0).all()  # padded regions get none


def test_attention_figure_draws_one_panel_per_word(tmp_path):
    image = Image.fromarray((np.indices((64, 64)).sum(axis=0) * 2 % 256).astype(np.uint8)).convert("RGB")
    weights = torch.softmax(torch.randn(3, 4), dim=-1)  # 3 words over a 2 x 2 grid
    plot_attention(image, ["a", "red", "circle"], weights, "test", tmp_path / "map.png")
    assert_png_shows_something(tmp_path / "map.png")
    with pytest.raises(CaptionflowError, match="need grid features .* 5 regions"):
        plot_attention(image, ["a"], torch.ones(1, 5) / 5, "test", tmp_path / "regions.png")


def _history(path, columns, rows):
    path.write_text("\n".join(["\t".join(columns)] + ["\t".join(str(v) for v in row) for row in rows]) + "\n")
    return path


XE = ["epoch", "step", "train_loss", "val_cider_d", "lr"]


def test_learning_curves_per_stage(tmp_path):
    xe = _history(tmp_path / "xe.tsv", XE, [(e, 10 * e, 5 - e, 0.1 * e, 1e-3 / (e + 1)) for e in range(4)])
    e2e = _history(tmp_path / "e2e.tsv", XE, [(e, 10 * e, 3 - 0.1 * e, 0.5 + 0.1 * e, 1e-4) for e in range(2)])
    scst = _history(
        tmp_path / "scst.tsv",
        [*XE, "reward", "baseline"],
        [(e, 5 * e, -1, 0.7 + 0.1 * e, 5e-5, 0.6 + 0.1 * e, 0.55 + 0.1 * e) for e in range(3)],
    )
    es_columns = ["epoch", "step", "val_cider_d", "best_fitness", "mean_fitness", "elite_fitness", "noise_stdev"]
    es = _history(
        tmp_path / "es.tsv", es_columns, [(e, e, "" if e % 2 else 0.3, 0.4 + 0.01 * e, 0.3, "", 0.01) for e in range(6)]
    )
    written = plot_curves("demo", {"xe": xe, "e2e": e2e, "scst": scst}, tmp_path / "a")
    assert [p.name for p in written] == ["training.png", "scst.png"]
    assert plot_curves("demo", {"xe": xe, "es": es}, tmp_path / "b")[-1].name == "es.png"
    assert [p.name for p in plot_curves("demo", {"es": es}, tmp_path / "c")] == ["es.png"]
    for path in [*written, tmp_path / "b/es.png"]:
        assert_png_shows_something(path)


def test_a_history_that_is_not_numbers_is_one_line(tmp_path):
    bad = _history(tmp_path / "xe.tsv", XE, [(0, 1, "nan?", 0.1, 1e-3)])
    with pytest.raises(CaptionflowError, match=r"history .*xe.tsv holds a value that is not a number"):
        plot_curves("demo", {"xe": bad}, tmp_path / "out")
    with pytest.raises(CaptionflowError, match=r"history .*missing.tsv cannot be read"):
        plot_curves("demo", {"xe": tmp_path / "missing.tsv"}, tmp_path / "out")


def test_gallery_embeds_n_images_with_every_stage_and_two_references(tmp_path):
    ids = [11, 12, 13, 14]
    (tmp_path / "img").mkdir()
    for i in ids:
        Image.fromarray(np.full((40, 40, 3), 20 * i % 256, dtype=np.uint8)).save(tmp_path / f"img/{i}.jpg")
    (tmp_path / "manifest.json").write_text(
        json.dumps({"image_dir": str(tmp_path / "img"), "images": [{"id": i, "file_path": f"{i}.jpg"} for i in ids]})
    )
    (tmp_path / "labels.json").write_text(
        json.dumps({"images": [{"id": 1, "split": "train"}] + [{"id": i, "split": "test"} for i in ids]})
    )
    (tmp_path / "references.json").write_text(
        json.dumps({"test": {str(i): [f"ref {i} a", f"ref {i} b", f"ref {i} c"] for i in ids}})
    )
    for stage in ("xe", "scst"):
        (tmp_path / f"{stage}.json").write_text(
            json.dumps([{"image_id": i, "caption": f"{stage} says <{i}>"} for i in ids])
        )
    out = tmp_path / "gallery.html"
    write_gallery(
        "demo",
        {"xe": tmp_path / "xe.json", "scst": tmp_path / "scst.json"},
        tmp_path / "references.json",
        tmp_path / "labels.json",
        tmp_path / "manifest.json",
        out,
        images=3,
    )
    page = out.read_text()
    assert re.findall(r"data-image-id='(\d+)'", page) == ["11", "12", "13"]
    assert page.count("src='data:image/jpeg;base64,") == 3
    assert "xe says &lt;12&gt;" in page and "scst says &lt;13&gt;" in page  # escaped
    assert "ref 11 b" in page and "ref 11 c" not in page  # two references


def _metrics(path, cider, **extra):
    scores = {
        "Bleu_1": 0.5,
        "Bleu_2": 0.4,
        "Bleu_3": 0.3,
        "Bleu_4": 0.2,
        "METEOR": 0.2,
        "ROUGE_L": 0.4,
        "CIDEr": cider,
        "SPICE": None,
        "bad_endings": 0.25,
    }
    path.write_text(
        json.dumps(
            {
                "model": "show_attend_tell",
                "decoding": {"method": "beam", "beam_size": 3, "max_len": 16, "alpha": 0.0},
                "metrics": scores,
                **extra,
            }
        )
    )
    return path


def test_metrics_table_has_every_experiment_and_stage_and_the_blind_gap(tmp_path):
    experiments = {
        "sat": {
            "xe": _metrics(tmp_path / "1.json", 0.8),
            "scst": _metrics(tmp_path / "2.json", 1.0, reward_signature="reward=CIDEr-D; baseline=greedy"),
        },
        "sat_blind": {"xe": _metrics(tmp_path / "3.json", 0.3)},
        "ens": {
            "ensemble": _metrics(tmp_path / "4.json", 0.9, reranked={"k": 3, "changed": 2, "metrics": {"CIDEr": 0.95}})
        },
    }
    write_metrics_table(experiments, {"sat": "sat_blind"}, tmp_path / "m.html", tmp_path / "m.tsv")
    rows = [line.split("\t") for line in (tmp_path / "m.tsv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    assert [(r[0], r[1]) for r in body] == [
        ("sat", "xe"),
        ("sat", "scst"),
        ("sat_blind", "xe"),
        ("ens", "ensemble"),
        ("ens", "ensemble reranked (top 3, 2 changed)"),
    ]
    gap = header.index("CIDEr-D gain over blind twin")
    assert body[0][gap] == "+0.5000 (sat_blind)" and body[1][gap] == ""  # the twin has no SCST stage
    assert body[1][header.index("reward signature")] == "reward=CIDEr-D; baseline=greedy"
    assert body[0][header.index("decoding")] == "beam 3, max_len 16, alpha 0" and body[0][header.index("SPICE")] == ""
    assert {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"} <= set(header)
    assert "<td>0.8000</td>" in (tmp_path / "m.html").read_text()
    ends = header.index("bad endings")  # the share of captions ending with a function word
    assert [r[ends] for r in body] == ["0.2500", "0.2500", "0.2500", "0.2500", ""]  # the reranked row has none


def test_benchmark_table_reads_rules_and_jobs(tmp_path):
    root = tmp_path / "benchmarks"
    (root / "train_xe").mkdir(parents=True)
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    # a `repeat()` benchmark holds one row per run: the latest counts
    (root / "train_xe/sat.tsv").write_text(
        head + "99\t0:01:39\t1\t1\t1\t1\t1\t1\t1\t1\n" + "15.36\t0:00:15\t782.17\t1\t1\t1\t1\t1\t1\t26.76\n"
    )
    (root / "prepro_labels.tsv").write_text(head + "0.16\t0:00:00\tNA\tNA\tNA\tNA\tNA\tNA\tNA\t0.1\n")
    rows = read_benchmarks(root)
    assert rows == [
        {"rule": "prepro_labels", "job": "", "seconds": 0.16, "max_rss_mb": None, "cpu_seconds": 0.1},
        {"rule": "train_xe", "job": "sat", "seconds": 15.36, "max_rss_mb": 782.17, "cpu_seconds": 26.76},
    ]
    write_benchmarks_table(root, tmp_path / "b.html")
    assert "<td>782</td>" in (tmp_path / "b.html").read_text()
    (root / "broken.tsv").write_text("s\n")
    with pytest.raises(CaptionflowError, match="benchmark .*broken.tsv cannot be read"):
        read_benchmarks(root)


def test_metrics_page_has_a_retrieval_table_even_without_captioning_rows(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "model": "gna_rnn",
                "person_search": True,
                "end_to_end": False,
                "text_to_image": {"R@1": 12.34, "R@5": 50.0, "R@10": 75.0, "mAP": 30.06},
                "image_to_text": {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0, "mAP": 40.0},
            }
        )
    )
    write_metrics_table({}, {}, tmp_path / "m.html", tmp_path / "m.tsv", retrieval={"r": str(path)})
    page = (tmp_path / "m.html").read_text()
    row = page[page.index("<td class='text'>r</td>") :].split("</tr>")[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>")[:-1]]
    assert cells == ["r", "gna_rnn", "person search", "12.3", "50.0", "75.0", "30.1", "20.0", "60.0", "80.0", "40.0"]
    assert "Test metrics: every experiment x stage" not in page  # no captioner, no empty captioning table
    # the TSV stays the captioning table: its header and no row
    assert len((tmp_path / "m.tsv").read_text().splitlines()) == 1
