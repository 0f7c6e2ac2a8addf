"""Frozen teachers: their recipe and cache, the output store, calibration and checks."""
