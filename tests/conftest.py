"""Shared test setup: no network, small generated data."""

import os

# A stray hub call fails at once instead of retrying for 45 s.
os.environ["HF_HUB_OFFLINE"] = "1"
