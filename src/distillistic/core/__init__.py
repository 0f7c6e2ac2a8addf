"""Pure tensor code: teaching signals, the objective and its terms, divergences, metrics, calibration."""
