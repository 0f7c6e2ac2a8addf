"""Run outputs: the run directory, its summary, exports and what a run says on the terminal."""
