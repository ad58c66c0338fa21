"""Tests of mer_ray/ensemble (no Ray)."""
