"""Random-weight MoE checkpoints built locally from transformers configs.

Used by the tests (one tiny model per family) and by benchmarks of real shapes. Random routing is
unrealistically sticky: never quote hit rates from these.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
# Per-family extras giving E = 8 routed experts, top-2 (DeepSeek: one dense layer first).
TINY: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=2,
        topk_group=1,
    ),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        num_local_experts=8, num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention", "full_attention"]
    ),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
}


def make_config(model_type: str, **overrides: Any):
    """A transformers config of `model_type`: tiny by default, any field overridable."""
    from transformers import AutoConfig

    kw = {**_COMMON, **TINY.get(model_type, {}), **overrides}
    if model_type == "gpt_oss" and "layer_types" not in overrides:
        n = kw["num_hidden_layers"]
        kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    cfg = AutoConfig.for_model(model_type, **kw)
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v >= cfg.vocab_size:
            setattr(cfg, attr, cfg.vocab_size - 1)
    return cfg


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A random-weight transformers model for `config` (router weights scaled to route non-trivially)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02 if p.dim() > 1 else 0.01)
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2 and p.shape[0] < 1024:
                p.mul_(10.0)  # routers far from uniform, as in trained models
    return model.to(device).eval()


def byte_tokenizer(chat_template: bool = True):
    """A byte-level tokenizer (256 byte tokens + 4 specials), built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {s: 256 + i for i, s in enumerate(specials)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return fast


def _byte_of(ch: str) -> int:
    """The byte a GPT-2 byte-level alphabet character stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def build_random_checkpoint(
    path: str | os.PathLike,
    config,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """Save a random-weight model of `config` in the standard per-expert layout; returns the dir."""
    path = Path(path)
    model = random_model(config, seed, dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if tokenizer:
        byte_tokenizer().save_pretrained(path)
    (path / "finemoe_synthetic.json").write_text(json.dumps({"random_weights": True, "seed": seed}))
    return path


def cache_dir() -> Path:
    """Where finemoe keeps built models: $FINEMOE_CACHE or ~/.cache/finemoe."""
    return Path(os.environ.get("FINEMOE_CACHE", Path.home() / ".cache" / "finemoe")).expanduser()
