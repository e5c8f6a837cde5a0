"""Model shapes the benchmarks build with random weights (no download)."""

from typing import Any

# Qwen2.5-0.5B's configuration: the size most users of plora fine-tune first.
QWEN2_5_0_5B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,  # the spelling transformers 4.x and 5.x both accept
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

# SmolLM2-135M's configuration (the demo model's base): a Llama with 3 key/value heads of 9.
SMOLLM2_135M: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
