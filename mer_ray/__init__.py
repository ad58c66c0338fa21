"""mer-ray: multimodal emotion recognition in conversations with LLMs, on Ray."""

__version__ = "0.1.0"
