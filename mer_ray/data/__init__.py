"""The utterance schema, loaders (MELD, manifests), label sets and maps, the gold-label leak guard, receptive fields."""
