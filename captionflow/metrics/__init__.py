"""Caption metrics: the COCO caption scores (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE)."""
