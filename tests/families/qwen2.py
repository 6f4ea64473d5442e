"""Qwen2 with GQA (6 query heads sharing 2 KV heads) and biases on q/k/v; no sliding window."""

from transformers import Qwen2Config, Qwen2ForCausalLM

from .llama import hand_heads, hand_module, layers, mlp, norms  # noqa: F401  (same module tree as Llama)

VOCAB = 97


def tiny():
    config = Qwen2Config(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        use_sliding_window=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config)
