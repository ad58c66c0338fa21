"""Utterance schema, loaders, label sets and receptive-field slicing."""
