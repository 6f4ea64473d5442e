"""Mistral with GQA (6 query heads sharing 2 KV heads); sliding window wider than any test sequence."""

from transformers import MistralConfig, MistralForCausalLM

from .llama import hand_heads, hand_module, layers, mlp, norms  # noqa: F401  (same module tree as Llama)

VOCAB = 97


def tiny():
    config = MistralConfig(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return MistralForCausalLM(config)
