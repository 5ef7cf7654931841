"""Data stages: the demo dataset, image resizing and label preprocessing."""
