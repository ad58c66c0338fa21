"""The label-scorer interface and its backends (llama.cpp, transformers, OpenAI-compatible HTTP), and prompt templates."""
