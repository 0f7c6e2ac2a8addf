"""The one training loop and everything a run needs: runtime, checkpoints, run directory, teachers, store, export."""
