"""Evaluation: captioning a split and scoring it (captioning: the evaluate stage, ensembles,
reranking, the per-stage table; split_captions: decoding every image of a split and the fast
CIDEr-D of validation), and retrieval models' loading, gallery features and scoring
(retrieval: the evaluate_retrieval stage). Training imports this package for validation;
this package never imports training."""
