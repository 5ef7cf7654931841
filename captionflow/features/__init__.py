"""Backbones and feature extraction into HDF5."""
