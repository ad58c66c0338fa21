"""Calibrated probabilities (temperature scaling) and split-conformal prediction sets, fitted on dev."""
