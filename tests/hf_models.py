"""Tiny random Hugging Face MoE models built from transformers' config classes.

Shared by the swap, capture and CLI tests; nothing is downloaded.
"""

from __future__ import annotations

import transformers
from torch import nn

V, D = 64, 16
COMMON = {
    "vocab_size": V,
    "hidden_size": D,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def mixtral() -> nn.Module:
    cfg = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON)
    return transformers.MixtralForCausalLM(cfg)


def qwen2() -> nn.Module:
    cfg = transformers.Qwen2MoeConfig(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        **COMMON,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def deepseek() -> nn.Module:
    cfg = transformers.DeepseekV3Config(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
        **{**COMMON, "num_key_value_heads": 2},
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


def gpt_oss() -> nn.Module:
    cfg = transformers.GptOssConfig(
        num_local_experts=4, num_experts_per_tok=2, head_dim=8, **COMMON
    )
    return transformers.GptOssForCausalLM(cfg)


def llama4() -> nn.Module:
    cfg = transformers.Llama4TextConfig(
        num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=32, head_dim=8, **COMMON
    )
    return transformers.Llama4ForCausalLM(cfg)


def switch() -> nn.Module:
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=V, d_model=D, d_ff=32, d_kv=8, num_heads=2, num_layers=2,
        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        num_experts=4, expert_capacity=4,
        dropout_rate=0.0, router_jitter_noise=0.0,  # train mode stays deterministic
    )  # fmt: skip
    return transformers.SwitchTransformersForConditionalGeneration(cfg)
