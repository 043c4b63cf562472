# Tiny random Hugging Face causal LMs and tokenizers for the pretrained-backbone tests (made locally, no download).
from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("a red circle on a blue square. the green triangle is small; two yellow dots!\n"
        "Qwen and Llama read text as tokens: 12 + 30 = 42, über café naïve 日本語 🙂")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", *[f"<|reserved_special_token_{i}|>" for i in range(8)]]
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
VOCAB = 320  # embedding rows of the tiny models (more than the tokenizer's ids, as in Qwen2.5)


def save_tokenizer(out: Path, family: str) -> None:
    """A byte-level BPE (the Llama 3 / Qwen2 kind) trained on a few lines, with the family's
    special tokens, saved as transformers would (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = QWEN_SPECIALS if family == "qwen" else LLAMA_SPECIALS
    tok = Tokenizer(models.BPE())
    if family == "qwen":  # what Qwen2's tokenizer.json holds (transformers rebuilds the same for qwen2)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    kw = ({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"} if family == "qwen"
          else {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(out)


def make_hf_model(out: Path, kind: str, seed: int = 0, sharded: bool = False, **overrides):
    """A tiny random ``kind`` (llama, qwen2, qwen3) model saved with ``save_pretrained`` into
    ``out`` with its tokenizer; norms and biases are perturbed so a wrong mapping shows.

    Returns:
        the transformers model (eval mode, fp32).
    """
    import transformers as tf

    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512)
    extra = {"llama": dict(rope_theta=5000.0, rope_scaling={"rope_type": "llama3", "factor": 4.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 64}),
             "qwen2": dict(rope_theta=20000.0, tie_word_embeddings=True),
             "qwen3": dict(head_dim=32, rope_theta=10000.0)}[kind]
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[kind]
    model = cls[1](cls[0](**{**base, **extra, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="40KB" if sharded else "5GB")
    save_tokenizer(out, "llama" if kind == "llama" else "qwen")
    return model
