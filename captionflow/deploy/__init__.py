"""Deployment: model bundles, the captioner that runs them, and ONNX export."""
