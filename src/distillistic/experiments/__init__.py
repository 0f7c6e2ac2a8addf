"""Sweeps, reports, plots and the demo: many runs of the trainer."""
