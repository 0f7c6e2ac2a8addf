"""Datasets, splits, loading, augmentation and device-side views."""
