"""Gemma with GQA (6 query heads sharing 2 KV heads); embeddings scaled by sqrt(d_model) inside
the embedding module, (1 + weight) RMS norms, tied lm_head."""

from transformers import GemmaConfig, GemmaForCausalLM

from .llama import hand_heads, hand_module, layers, mlp, norms  # noqa: F401  (same module tree as Llama)

VOCAB = 97


def tiny():
    config = GemmaConfig(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GemmaForCausalLM(config)
