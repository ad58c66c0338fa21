"""A tiny causal LM built from a config, saved as a Hugging Face directory (tests, smoke runs).

The tokenizer is a byte-level BPE trained in-process on a few sentences, so
nothing is downloaded; labels split into several sub-word tokens, which
exercises multi-token label scoring.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Task: name the emotion of the last utterance. Options: neutral, joy, surprise, anger, sadness, disgust, fear.",
    "Conversation: Emotion of the last utterance: Example: Reason:",
    "Oh my God, I can't believe it! That is so great, I love you guys.",
    "What are you talking about? Get out of here. I hate this.",
    "Okay, so we're going to the coffee house. Yeah, sure, whatever.",
]


def build_tiny_lm(out: str | Path, family: str = "gemma3", hidden: int = 32, layers: int = 2, seed: int = 0,
                  single_token_words: tuple[str, ...] = ()) -> Path:
    """Write a random tiny ``family`` (``gemma3`` or ``llama``) causal LM and its tokenizer to ``out``.

    Args:
        single_token_words: words that become one token each with a leading space (``" joy"``), as the label
            set is for Gemma and SmolLM2; template ``farcer-dialogue-v1`` needs that.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if single_token_words:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(" " + w, normalized=False) for w in single_token_words])
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(**common, sliding_window=64)
    elif family == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common)
    else:
        raise ValueError(f"tiny LM family must be 'gemma3' or 'llama', got {family!r}")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def build_tiny_finetuned(base: str | Path, out: str | Path, label_set: str = "meld7", seed: int = 0, lora: bool = True) -> Path:
    """A fine-tuned directory as ``mer finetune`` writes it, on the tiny ``base``, without training (tests, smoke runs).

    Its LoRA B matrices are drawn at random (peft starts them at 0, which would make every adapter the base
    model), so two directories with different seeds really answer differently.
    """
    from mer_ray.data.labels import get_label_set
    from mer_ray.mllm.artifacts import save_artifacts
    from mer_ray.mllm.build import ModelConfig, build_mllm
    from mer_ray.mllm.examples import PromptConfig

    cfg = ModelConfig(base=str(base), label_set=label_set, **({} if lora else {"lora": None}))
    model, _ = build_mllm(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    meta = {"labels": list(get_label_set(label_set).labels), "label_set": label_set, "model": cfg.model_dump(),
            "prompt": PromptConfig().model_dump(), "shots": [], "template_version": "farcer-v1", "base_model": cfg.base}
    return save_artifacts(out, model.state_dict(), model, meta)
