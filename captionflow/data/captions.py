"""Training/evaluation data: one split's features (HDF5) joined with its labels.

Features are read into memory when they fit (`max_memory_mb`), otherwise row by row from
the HDF5 file per batch (COCO grid features of a large backbone run to tens of GB).
"""

import json

import h5py
import numpy as np
import torch

from captionflow.errors import CaptionflowError


class FeatureStore:
    """Rows of one split's feature HDF5, in labels-JSON order.

    get(rows) -> {"att": (N, R, D), "fc": (N, D)} float32 tensors, plus "att_mask" (N, R)
    bool (True = a real region) for region features with a variable box count (bottom-up
    files). blind=True returns zeros of the same shapes (the image-blind baseline).
    """

    def __init__(self, path, expected_ids=None, blind=False, max_memory_mb=4096):
        self.path = path
        self.blind = blind
        self.file = h5py.File(path, "r")
        ids = self.file["image_id"][()]
        if expected_ids is not None and ids.tolist() != list(expected_ids):
            raise CaptionflowError(f"features {path} do not list the labels' images in their order; rerun extract_features")
        self.ids = ids
        self.att_shape = self.file["att"].shape[1:]
        self.feat_dim = self.file["fc"].shape[1]
        self.keys = ("att", "fc", "att_mask") if "att_mask" in self.file else ("att", "fc")
        size_mb = sum(self.file[k].nbytes for k in self.keys) / 2**20
        self.memory = None
        if size_mb <= max_memory_mb:
            self.memory = {k: self._tensor(self.file[k][()], k) for k in self.keys}

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
        return {k: self._tensor(self.file[k][uniq][inverse], k) for k in self.keys}


class SplitData:
    """One split: images (feature rows), their caption rows, and references.

    features=None: labels only (end-to-end training computes features from the images).
    """

    def __init__(self, labels_h5, labels_json, features, split, blind=False):
        with open(labels_json) as f:
            index = json.load(f)
        self.ix_to_word = index["ix_to_word"]
        self.vocab_hash = index["vocab_hash"]
        self.vocab_size = len(self.ix_to_word)
        images = [(i, img) for i, img in enumerate(index["images"]) if img["split"] == split]
        if not images:
            raise CaptionflowError(f"split {split!r} has no images in {labels_json}")
        self.image_ids = [img["id"] for _, img in images]
        self.features = None if features is None else FeatureStore(features, self.image_ids, blind=blind)
        with h5py.File(labels_h5, "r") as f:
            start, end = f["label_start_ix"][()], f["label_end_ix"][()]
            labels, lengths = f["labels"][()], f["label_length"][()]
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
