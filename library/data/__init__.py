"""Datasets, captions and caches."""
