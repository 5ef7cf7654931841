"""Training/evaluation data: one split's features (HDF5) joined with its labels.

Features are read into memory when they fit (`max_memory_mb`), otherwise row by row from
the HDF5 file per batch (COCO grid features of a large backbone run to tens of GB).
Every file is checked as it is read, in one line naming it: a truncated or foreign HDF5,
missing datasets, and feature rows holding NaN or inf (which would train to NaN weights).
"""

import json

import h5py
import numpy as np
import torch

from captionflow.errors import CaptionflowError

REEXTRACT = "delete it and rerun snakemake to extract the features again"
RELABEL = "delete it and rerun snakemake to run prepro_labels again"
CHECK_ROWS = 4096  # rows per finiteness check of in-memory features (bounded extra memory)


def read_index(labels_json):
    """The labels JSON (vocabulary, images, splits), or a one-line error naming it."""
    try:
        with open(labels_json, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CaptionflowError(f"labels index {labels_json} does not exist; run prepro_labels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionflowError(f"labels index {labels_json} is not valid JSON ({exc}); {RELABEL}") from None


def open_h5(path, what, fix):
    """h5py.File(path, "r"), or a one-line error for a missing, truncated or foreign file."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise CaptionflowError(f"{what} {path} does not exist; {fix}") from None
    except OSError as exc:  # h5py: "Unable to open file (file signature not found)", "(truncated file: ...)"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptionflowError(f"{what} {path} is not a readable HDF5 file (truncated or another format: {reason}); {fix}") from None


def require_datasets(f, path, what, names, fix):
    missing = [n for n in names if not isinstance(f.get(n), h5py.Dataset)]
    if missing:
        raise CaptionflowError(f"{what} {path} has no {', '.join(missing)} dataset: not a captionflow {what} file; {fix}")


class FeatureStore:
    """Rows of one split's feature HDF5, in labels-JSON order.

    get(rows) -> {"att": (N, R, D), "fc": (N, D)} float32 tensors, plus "att_mask" (N, R)
    bool (True = a real region) for region features with a variable box count (bottom-up
    files). blind=True returns zeros of the same shapes (the image-blind baseline).
    """

    def __init__(self, path, expected_ids=None, blind=False, max_memory_mb=4096):
        self.path = path
        self.blind = blind
        self.file = open_h5(path, "features", REEXTRACT)
        require_datasets(self.file, path, "features", ("att", "fc", "image_id"), REEXTRACT)
        att, fc = self.file["att"], self.file["fc"]
        ids = self._read(lambda: self.file["image_id"][()])
        if att.ndim != 3 or fc.ndim != 2 or att.shape[2] != fc.shape[1] or not len(att) == len(fc) == len(ids):
            raise CaptionflowError(
                f"features {path} have inconsistent shapes (att {att.shape}, fc {fc.shape}, image_id {ids.shape}; "
                f"expected (N, R, D), (N, D), (N,)); {REEXTRACT}"
            )
        if expected_ids is not None and ids.tolist() != list(expected_ids):
            raise CaptionflowError(f"features {path} do not list the labels' images in their order; rerun extract_features")
        self.ids = ids
        self.att_shape = att.shape[1:]
        self.feat_dim = fc.shape[1]
        self.keys = ("att", "fc", "att_mask") if "att_mask" in self.file else ("att", "fc")
        size_mb = sum(self.file[k].nbytes for k in self.keys) / 2**20
        self.memory = None
        if size_mb <= max_memory_mb:
            self.memory = {k: self._tensor(self._read(lambda k=k: self.file[k][()]), k) for k in self.keys}
            if not blind:  # the image-blind baseline never reads the values
                for k in ("att", "fc"):
                    self._check_finite(k, self.memory[k], np.arange(len(ids)))

    def _read(self, read):
        """Run an h5py read; a damaged file is one line, not h5py's OSError."""
        try:
            return read()
        except OSError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptionflowError(f"features {self.path} cannot be read ({reason}); {REEXTRACT}") from None

    def _check_finite(self, key, values, rows):
        """Refuse rows of `values` (N, ...) holding NaN or inf; rows: their row numbers."""
        bad = []
        for b in range(0, len(values), CHECK_ROWS):
            chunk = values[b : b + CHECK_ROWS]
            bad.append(torch.nonzero(~torch.isfinite(chunk).flatten(1).all(1)).flatten() + b)
        bad = torch.cat(bad) if bad else torch.zeros(0, dtype=torch.long)
        if len(bad):
            row = int(rows[int(bad[0])])
            raise CaptionflowError(
                f"features {self.path}: row {row} (image {int(self.ids[row])}) of {key} holds NaN or inf values "
                f"({len(bad)} such row{'s' if len(bad) > 1 else ''} of {len(values)} read); training on them gives NaN weights: {REEXTRACT} "
                "(if they come back so, check features.weights)"
            )

    @staticmethod
    def _tensor(array, key):
        return torch.from_numpy(array if key == "att_mask" else array.astype(np.float32))

    def __len__(self):
        return len(self.ids)

    def get(self, rows):
        rows = np.asarray(rows)
        if self.blind:
            return {
                "att": torch.zeros(len(rows), *self.att_shape),
                "fc": torch.zeros(len(rows), self.feat_dim),
            }
        if self.memory is not None:
            index = torch.from_numpy(rows)
            return {k: v.index_select(0, index) for k, v in self.memory.items()}
        # h5py wants increasing indices: read sorted unique rows, then put them back in order
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = {k: self._tensor(self._read(lambda k=k: self.file[k][uniq][inverse]), k) for k in self.keys}
        for k in ("att", "fc"):
            self._check_finite(k, out[k], rows)
        return out


class SplitData:
    """One split: images (feature rows), their caption rows, and references.

    features=None: labels only (end-to-end training computes features from the images).
    """

    def __init__(self, labels_h5, labels_json, features, split, blind=False):
        index = read_index(labels_json)
        self.ix_to_word = index["ix_to_word"]
        self.vocab_hash = index["vocab_hash"]
        self.vocab_size = len(self.ix_to_word)
        images = [(i, img) for i, img in enumerate(index["images"]) if img["split"] == split]
        if not images:
            raise CaptionflowError(f"split {split!r} has no images in {labels_json}")
        self.image_ids = [img["id"] for _, img in images]
        # person search: each image's identity (all images of one person match); else None
        ids = [img.get("person_id") for _, img in images]
        self.person_ids = None if None in ids else ids
        self.features = None if features is None else FeatureStore(features, self.image_ids, blind=blind)
        with open_h5(labels_h5, "labels", RELABEL) as f:
            require_datasets(f, labels_h5, "labels", ("labels", "label_start_ix", "label_end_ix", "label_length"), RELABEL)
            try:
                start, end = f["label_start_ix"][()], f["label_end_ix"][()]
                labels, lengths = f["labels"][()], f["label_length"][()]
            except OSError as exc:
                raise CaptionflowError(f"labels {labels_h5} cannot be read ({str(exc).strip().splitlines()[0]}); {RELABEL}") from None
        # One training item per caption: (feature row, caption row), 1-based -> 0-based
        cap_rows, img_rows = [], []
        for row, (label_index, _) in enumerate(images):
            for c in range(start[label_index] - 1, end[label_index]):
                cap_rows.append(c)
                img_rows.append(row)
        self.caption_rows = np.asarray(cap_rows)
        self.caption_image = np.asarray(img_rows)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.lengths = lengths[self.caption_rows]

    def caption_batch(self, items):
        """items: indices into this split's captions -> (feats, inputs (N, T), targets (N, T), mask (N, T)).

        feats is None for a labels-only SplitData.

        inputs start with 0 (start token); targets end with 0 (end token); T = max length + 1.
        """
        rows = self.caption_rows[items]
        words = self.labels[torch.from_numpy(rows)]  # (N, L), zero-padded
        T = int(self.lengths[items].max()) + 1
        targets = torch.zeros(len(items), T, dtype=torch.long)
        targets[:, : T - 1] = words[:, : T - 1]
        inputs = torch.zeros_like(targets)
        inputs[:, 1:] = targets[:, :-1]
        lengths = torch.from_numpy(self.lengths[items].astype(np.int64))
        mask = (torch.arange(T)[None, :] <= lengths[:, None]).float()  # words + end token
        feats = None if self.features is None else self.features.get(self.caption_image[items])
        return feats, inputs, targets, mask
