"""Lantern: queries per receptive field, the LLM prompt job (Ray Data), the receptive-field-aware fusion model, its fitting and prediction."""
