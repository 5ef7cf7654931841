"""Stages that orchestrate the library for one rule (decode + score, reports)."""
