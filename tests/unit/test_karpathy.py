"""Caption files in the wrong shape: one line naming the offending record."""

import json

import pytest

from captionflow.data.karpathy import _parse_image, _quick_image, load_karpathy, tokenize
from captionflow.errors import CaptionflowError


def _image(i, split="train", **over):
    img = {
        "filepath": "val2014",
        "filename": f"img{i}.jpg",
        "imgid": i,
        "cocoid": 1000 + i,
        "split": split,
        "sentences": [{"tokens": ["a", "cat"], "raw": "A cat."}],
    }
    img.update(over)
    return img


def _write(tmp_path, data):
    path = tmp_path / "captions.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"annotations": []}, "expected a top-level object with an 'images' list"),
        ([1, 2], "expected a top-level object with an 'images' list"),
        ({"images": []}, "the 'images' list is empty"),
        ({"images": [_image(0), _image(1, sentences=[])]}, "images[1] (id 1001, img1.jpg) has no sentences"),
        ({"images": [_image(0, split="trian")]}, "images[0] (id 1000, img0.jpg) has split 'trian'; expected one of"),
        ({"images": [_image(0), _image(1, cocoid=1000)]}, "images[1] has the same id 1000 as images[0]"),
        ({"images": [_image(0, sentences=[{"imgid": 0}])]}, "sentences[0] has neither a 'tokens' list"),
        ({"images": [{"split": "train"}]}, "images[0] has no 'filename'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_wrong_shape_is_one_line_naming_the_record(tmp_path, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(CaptionflowError) as err:
        load_karpathy(path)
    message = str(err.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(CaptionflowError, match="does not exist"):
        load_karpathy(tmp_path / "nope.json")


def test_flickr_style_ids_and_raw_only_sentences(tmp_path):
    img = _image(7, sentences=[{"raw": "Two dogs, running on the beach!"}])
    del img["cocoid"]
    (rec,) = load_karpathy(_write(tmp_path, {"images": [img]}))
    assert rec.id == 7
    assert rec.file_path == "val2014/img7.jpg"
    assert rec.captions == (("two", "dogs", "running", "on", "the", "beach"),)
    assert tokenize("It's a dog.") == ["it's", "a", "dog"]


def test_not_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "captions.json"
    text = json.dumps({"images": [_image(0, sentences=[{"raw": "Un café."}])]}, ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))  # é as one byte 0xe9: not UTF-8
    with pytest.raises(CaptionflowError) as err:
        load_karpathy(path)
    offset = text.encode("latin-1").index(b"\xe9")
    assert f"captions file {path}: not UTF-8 text (byte {offset}: b'\\xe9')" in str(err.value)
    assert "\n" not in str(err.value)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark is fine
    assert load_karpathy(path)[0].raw == ("Un café.",)


def test_not_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, '{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(CaptionflowError, match=r"not valid JSON at line 2, column 24: Expecting property name"):
        load_karpathy(path)
    deep = _write(tmp_path, "[" * 100000 + "]" * 100000)
    with pytest.raises(CaptionflowError, match="nested too deeply"):
        load_karpathy(deep)


@pytest.mark.parametrize(
    "over, expected",
    [
        ({"filename": 5}, "images[0] has 'filename' 5; expected a non-empty file name"),
        ({"filename": ""}, "images[0] has 'filename' ''; expected a non-empty file name"),
        ({"filepath": ["a"]}, "images[0] (img0.jpg) has 'filepath' ['a']"),
        ({"cocoid": True}, "images[0] (img0.jpg) has no integer 'cocoid' or 'imgid'"),
        ({"sentences": ["a cat"]}, "sentences[0] has neither a 'tokens' list"),
        ({"sentences": [{"tokens": ["", " ", "\t"]}]}, "sentences[0] is empty (no word in its tokens)"),
    ],
)
def test_more_wrong_shapes_are_one_line(tmp_path, over, expected):
    path = _write(tmp_path, {"images": [_image(0, **over)]})
    with pytest.raises(CaptionflowError) as err:
        load_karpathy(path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_blank_and_whitespace_tokens_are_no_words(tmp_path):
    img = _image(0, sentences=[{"tokens": ["a", "", " ", "big ", " cat", "hot dog"]}])
    (rec,) = load_karpathy(_write(tmp_path, {"images": [img]}))
    assert rec.captions == (("a", "big", "cat", "hot", "dog"),)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"filepath": ""},
        {"filepath": None},
        {"filepath": "val2014/"},
        {"filepath": "./a//b"},
        {"filepath": "/data/coco"},
        {"filepath": "."},
        {"filename": ".."},
        {"filename": "a b.jpg"},
        {"filename": "sub/./img0.jpg"},
        {"filename": "."},
        {"person_id": 3},
        {"sentences": [{"tokens": ["a", "cat"]}, {"tokens": ["big ", " cat", "hot dog"], "raw": "Hot."}]},
        {"sentences": [{"tokens": ["a"], "raw": 5}]},
        {"sentences": [{"raw": "Two dogs."}]},
    ],
)
def test_quick_path_gives_the_full_checks_record(tmp_path, over):
    # load_karpathy takes _quick_image's record where it gives one; it must be _parse_image's.
    img = _image(0, **over)
    (rec,) = load_karpathy(_write(tmp_path, {"images": [img]}))
    assert rec == _parse_image(img, "images[0]")
    quick = _quick_image(img, {})
    assert quick is None or quick == rec
    if over.keys() <= {"filepath", "person_id"} or over == {"filename": "a b.jpg"}:
        assert quick is not None  # the usual shapes do take the quick path
