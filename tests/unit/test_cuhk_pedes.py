"""CUHK-PEDES reid_raw.json -> Karpathy schema: identities kept, bad records one line."""

import json
from collections import defaultdict

import pytest

from captionflow.data.cuhk_pedes import import_cuhk_pedes, write_demo_reid_raw
from captionflow.data.karpathy import load_karpathy, tokenize
from captionflow.errors import CaptionflowError


def _record(i=0, **over):
    """One record in the real layout (CUHK01 naming: person 0363, image 004)."""
    record = {
        "split": "train",
        "captions": ["A man in a black coat.", "The man wears a black coat and jeans."],
        "file_path": f"CUHK01/0363{i:03d}.png",
        "processed_tokens": [
            ["a", "man", "in", "a", "black", "coat"],
            ["the", "man", "wears", "a", "black", "coat", "and", "jeans"],
        ],
        "id": 363,
    }
    record.update(over)
    return record


def _write(tmp_path, data):
    path = tmp_path / "reid_raw.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_demo_file_imports_with_splits_identities_tokens_and_paths(tmp_path):
    raw_path = write_demo_reid_raw(tmp_path / "reid_raw.json", n_ids=12, images_per_id=3, seed=5)
    source = json.loads(raw_path.read_text())
    assert {tuple(sorted(r)) for r in source} == {("captions", "file_path", "id", "processed_tokens", "split")}
    counts = import_cuhk_pedes(raw_path, tmp_path / "out" / "dataset_cuhk_pedes.json")
    assert counts == {"images": 36, "sentences": 72, "identities": 12, "splits": {"train": 24, "val": 6, "test": 6}}

    out = json.loads((tmp_path / "out" / "dataset_cuhk_pedes.json").read_text())
    assert out["dataset"] == "cuhk_pedes"
    images = out["images"]
    splits_of_person = defaultdict(set)
    for i, (src, img) in enumerate(zip(source, images, strict=True)):
        assert f"{img['filepath']}/{img['filename']}" == src["file_path"]
        assert (img["split"], img["person_id"], img["imgid"], img["cocoid"]) == (src["split"], src["id"], i, i)
        assert [s["tokens"] for s in img["sentences"]] == src["processed_tokens"]
        assert [s["raw"] for s in img["sentences"]] == src["captions"]
        assert {s["imgid"] for s in img["sentences"]} == {i}
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]] == [2 * i, 2 * i + 1]
        splits_of_person[img["person_id"]].add(img["split"])
    # three images per identity, and an identity never straddles two splits
    assert sorted(sum(img["person_id"] == p for img in images) for p in splits_of_person) == [3] * 12
    assert all(len(s) == 1 for s in splits_of_person.values())

    records = load_karpathy(tmp_path / "out" / "dataset_cuhk_pedes.json")  # what the data stages read
    assert [r.file_path for r in records] == [r["file_path"] for r in source]
    assert records[0].captions == tuple(tuple(t) for t in source[0]["processed_tokens"])
    assert not list((tmp_path / "out").glob(".*.tmp"))  # written atomically


def test_demo_file_is_seeded(tmp_path):
    a = write_demo_reid_raw(tmp_path / "a.json", n_ids=4, images_per_id=2, seed=1).read_text()
    b = write_demo_reid_raw(tmp_path / "b.json", n_ids=4, images_per_id=2, seed=1).read_text()
    c = write_demo_reid_raw(tmp_path / "c.json", n_ids=4, images_per_id=2, seed=2).read_text()
    assert a == b != c


def test_tokens_fall_back_to_the_raw_caption(tmp_path):
    without = _record()
    del without["processed_tokens"]
    empty = _record(1, processed_tokens=[[], [" "]])
    path = _write(tmp_path, [without, empty, _record(2, file_path="./CUHK01//0363002.png")])
    import_cuhk_pedes(path, tmp_path / "out.json")
    images = json.loads((tmp_path / "out.json").read_text())["images"]
    raw_tokens = [tokenize(c) for c in _record()["captions"]]
    assert [s["tokens"] for s in images[0]["sentences"]] == raw_tokens
    assert [s["tokens"] for s in images[1]["sentences"]] == raw_tokens
    assert (images[2]["filepath"], images[2]["filename"]) == ("CUHK01", "0363002.png")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"images": []}, "expected a list of image records (CUHK-PEDES reid_raw.json), found a dict"),
        ([], "the list of image records is empty"),
        ([_record(0), "CUHK01/0363001.png"], "record 1 is a str, expected an object"),
        ([_record(0), {k: v for k, v in _record(1).items() if k != "id"}], "record 1 has no 'id' field"),
        ([{"split": "train"}], "record 0 has no 'captions', 'file_path', 'id' field"),
        (
            [_record(0), _record(1, split="trainval")],
            "record 1 (CUHK01/0363001.png) has split 'trainval'; expected one of train, val, test",
        ),
        (
            [_record(0, file_path="/etc/passwd")],
            "record 0 has 'file_path' '/etc/passwd', which is absolute or has a '..' part",
        ),
        (
            [_record(0, file_path="CUHK01/../../x.png")],
            "record 0 has 'file_path' 'CUHK01/../../x.png', which is absolute or has a '..' part",
        ),
        ([_record(0, file_path="..\\x.png")], "which is absolute or has a '..' part"),
        ([_record(0, file_path="C:/imgs/x.png")], "which is absolute or has a '..' part"),
        ([_record(0, file_path="CUHK01/")], "which names a folder, not an image file"),
        ([_record(0, file_path="")], "record 0 has 'file_path' ''; expected a path relative to the images folder"),
        (
            [_record(0), _record(1, processed_tokens=[["a", "man"]])],
            "record 1 (CUHK01/0363001.png) has 2 captions but 1 'processed_tokens' lists",
        ),
        ([_record(0, captions=[], processed_tokens=[])], "record 0 (CUHK01/0363000.png) has no captions"),
        (
            [_record(0, captions="A man.")],
            "record 0 (CUHK01/0363000.png) has 'captions' that are not a list of strings",
        ),
        ([_record(0, processed_tokens=["a man", "b"])], "has 'processed_tokens' that are not a list of token lists"),
        ([_record(0, id="363")], "has 'id' '363'; expected an integer person identity"),
        (
            [_record(0), _record(1, id=2**63)],
            "record 1 (CUHK01/0363001.png) has 'id' 9223372036854775808, beyond the 64-bit integers",
        ),
        ([_record(0, id=-(2**63) - 1)], "record 0 (CUHK01/0363000.png) has 'id' -9223372036854775809, beyond"),
        ([_record(0, id=10**30)], "renumber the identities"),
        (
            [_record(0), _record(1), _record(0, id=364)],
            "record 2 (CUHK01/0363000.png) and record 0 (CUHK01/0363000.png) are the same image with person ids "
            "363 and 364; one image shows one person: correct the wrong 'id' or remove one of the records",
        ),
        (
            [_record(0), _record(1, id=364, file_path="./CUHK01//0363000.png")],
            "record 1 (./CUHK01//0363000.png) and record 0 (CUHK01/0363000.png) are the same image with person ids 363 and 364",
        ),
        (
            [_record(0), _record(0, split="test")],
            "record 1 (CUHK01/0363000.png) and record 0 (CUHK01/0363000.png) are the same image in splits 'train' and 'test'",
        ),
        (
            [_record(0, captions=["!!", "A man."], processed_tokens=[[], ["a", "man"]])],
            "record 0 (CUHK01/0363000.png): captions[0] has no word",
        ),
        ("[{not json", "not valid JSON at line 1"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_record(tmp_path, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(CaptionflowError) as err:
        import_cuhk_pedes(path, tmp_path / "out.json")
    message = str(err.value)
    assert expected in message
    assert message.startswith(f"CUHK-PEDES file {path}: ")
    assert "\n" not in message
    assert not (tmp_path / "out.json").exists()  # nothing half-written


def test_the_same_image_with_the_same_id_twice_is_one_image_with_all_its_captions(tmp_path):
    again = _record(0, captions=["A man walks."], processed_tokens=[["a", "man", "walks"]])
    path = _write(tmp_path, [_record(0), _record(1), again, _record(2, id=2**63 - 1)])  # the largest int64 id is fine
    counts = import_cuhk_pedes(path, tmp_path / "out.json")
    assert counts == {"images": 3, "sentences": 7, "identities": 2, "splits": {"train": 3, "val": 0, "test": 0}}
    images = json.loads((tmp_path / "out.json").read_text())["images"]
    assert [img["filename"] for img in images] == ["0363000.png", "0363001.png", "0363002.png"]  # first place kept
    assert [s["raw"] for s in images[0]["sentences"]] == _record()["captions"] + ["A man walks."]
    assert [(img["imgid"], img["cocoid"], img["sentids"]) for img in images] == [
        (0, 0, [0, 1, 2]),
        (1, 1, [3, 4]),
        (2, 2, [5, 6]),
    ]
    assert [[s["imgid"] for s in img["sentences"]] for img in images] == [[0, 0, 0], [1, 1], [2, 2]]
    assert images[2]["person_id"] == 2**63 - 1
    records = load_karpathy(tmp_path / "out.json")
    assert len(records[0].captions) == 3 and records[0].captions[2] == ("a", "man", "walks")
