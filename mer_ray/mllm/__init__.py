"""FARCER / Emotion-LLaMA: prompts and examples, projectors, the multimodal LM, Ray Train + DeepSpeed fine-tuning, prediction, artifacts."""
