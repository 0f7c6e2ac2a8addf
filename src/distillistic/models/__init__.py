"""The model registry: builders, weights, stage taps."""
