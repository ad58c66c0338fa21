"""Metrics, seed aggregation, reports and plots."""
