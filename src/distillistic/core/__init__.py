"""Pure tensor code: teaching signals, losses, the objective, the methods' registry, metrics."""
