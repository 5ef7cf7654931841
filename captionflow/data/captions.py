"""Training/evaluation data: one split's features (HDF5) joined with its labels.

Features come from a FeatureStore (captionflow.data.store): held in memory in the file's
dtype when the file fits, otherwise streamed in batches. Training items are captions; a
batch's features are read once per image (its captions share one row read) and, in
`caption_batches`, ahead of the training loop by a reader thread, converted to float32 on
the device. Every file is checked as it is read, in one line naming it: a truncated or
foreign HDF5, missing datasets, and feature rows holding NaN or inf (which would train to
NaN weights).
"""

import json

import numpy as np
import torch

from captionflow.data.store import RELABEL, FeatureStore, on_device, open_h5, prefetch, require_datasets
from captionflow.errors import CaptionflowError


def read_labels_json(labels_json):
    """The labels JSON (vocabulary, images, splits), or a one-line error naming it."""
    try:
        with open(labels_json, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CaptionflowError(f"labels JSON {labels_json} does not exist; run prepro_labels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionflowError(f"labels JSON {labels_json} is not valid JSON ({exc}); {RELABEL}") from None


class SplitData:
    """One split: images (feature rows), their caption rows, and references.

    features=None: labels only (end-to-end training computes features from the images).
    """

    def __init__(self, labels_h5, labels_json, features, split, blind=False):
        index = read_labels_json(labels_json)
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
            require_datasets(
                f, labels_h5, "labels", ("labels", "label_start_ix", "label_end_ix", "label_length"), RELABEL
            )
            try:
                start, end = f["label_start_ix"][()], f["label_end_ix"][()]
                labels, lengths = f["labels"][()], f["label_length"][()]
            except OSError as exc:
                raise CaptionflowError(
                    f"labels {labels_h5} cannot be read ({str(exc).strip().splitlines()[0]}); {RELABEL}"
                ) from None
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

    def _words(self, items):
        """items (N,) -> inputs (N, T), targets (N, T), mask (N, T) of those captions."""
        rows = self.caption_rows[items]
        words = self.labels[torch.from_numpy(rows)]  # (N, L), zero-padded
        T = int(self.lengths[items].max()) + 1
        targets = torch.zeros(len(items), T, dtype=torch.long)
        targets[:, : T - 1] = words[:, : T - 1]
        inputs = torch.zeros_like(targets)
        inputs[:, 1:] = targets[:, :-1]
        lengths = torch.from_numpy(self.lengths[items].astype(np.int64))
        mask = (torch.arange(T)[None, :] <= lengths[:, None]).float()  # words + end token
        return inputs, targets, mask

    def caption_batch(self, items):
        """items: indices into this split's captions -> (feats, inputs (N, T), targets (N, T), mask (N, T)).

        feats is None for a labels-only SplitData.

        inputs start with 0 (start token); targets end with 0 (end token); T = max length + 1.
        """
        feats = None if self.features is None else self.features.get(self.caption_image[items])
        return (feats, *self._words(items))

    def caption_batches(self, batches, device, depth=4):
        """Yield caption_batch(items) on `device` for each `items` of `batches`, in order.

        Reader threads prepare `depth` batches ahead (features in the file's dtype, pinned
        for CUDA); the copy to the device is non_blocking and converts to float32 there.
        The numbers are those of caption_batch; no random state is used, so a resumed run
        is unchanged.
        """
        pin = device.type == "cuda"

        def host(items, buffers):
            raw = None if self.features is None else self.features.read(self.caption_image[items], pin, buffers)
            words = self._words(items)
            return raw, [w.pin_memory() for w in words] if pin else words, buffers

        for raw, words, buffers in prefetch(host, batches, depth):
            feats = None if raw is None else on_device(*raw, device, buffers)
            yield (feats, *(w.to(device, non_blocking=pin) for w in words))
