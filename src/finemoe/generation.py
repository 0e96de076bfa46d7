"""The token loop: batched prefill and decode over a transformers causal LM with a KV cache.

Left padding, attention masks and position ids follow transformers' `generate` (positions are the
cumulative mask minus one, 0 on padding), so greedy output matches it token for token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from finemoe.config import SamplingParams


@dataclass
class Completion:
    """One finished sequence. Times in seconds; `tpot_s` is 0 when only one token was made."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    ttft_s: float
    tpot_s: float
    latency_s: float
    token_times_s: list[float]  # when each token was ready, seconds since the request started


def _pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from float32 logits [B, V] (greedy or temperature/top-k/top-p sampling)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # as transformers: keep up to top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).view(-1)


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    pad_id: int,
    stop_ids: set[int],
    device: torch.device,
    on_iteration: Callable[[int, bool, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[Completion]:
    """Generate for a batch of token-id prompts of any lengths; returns one Completion each.

    `on_iteration(step, is_prefill, input_ids [B, T], live [B, T] bool CPU)` runs before each
    forward pass; `live` marks real tokens (not padding, not finished sequences).
    """
    B = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, width]
    cache = DynamicCache(config=model.config)
    gen = None
    if not params.greedy:
        gen = torch.Generator()
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()  # a fresh seed for this generator only; global RNG state is untouched
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    finish = [""] * B
    stamps: list[list[float]] = [[] for _ in range(B)]
    t0 = time.perf_counter()
    inputs, positions = ids, pos
    live = mask.cpu().bool()
    for step in range(params.max_new_tokens):
        if on_iteration is not None:
            on_iteration(step, step == 0, inputs, live)
        logits = (
            model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1, :]
            .to(dtype=torch.float32)
        )  # [B, V]
        nxt = _pick(logits, params, gen).tolist()
        now = time.perf_counter()
        for i, tok in enumerate(nxt):
            if finish[i]:
                nxt[i] = pad_id
                continue
            out_tokens[i].append(tok)
            stamps[i].append(now)
            if tok in stop_ids and not params.ignore_eos:
                finish[i] = "stop"
        if all(finish):
            break
        inputs = torch.tensor(nxt, dtype=torch.long, device=device).view(B, 1)
        live = torch.tensor([not f for f in finish], dtype=torch.bool).view(B, 1)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=-1)
        positions = positions[:, -1:] + 1
    done = []
    for i in range(B):
        s = stamps[i]
        done.append(
            Completion(
                prompt_token_ids=list(prompts[i]),
                token_ids=out_tokens[i],
                finish_reason=finish[i] or "length",
                ttft_s=s[0] - t0,
                tpot_s=(s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else 0.0,
                latency_s=s[-1] - t0,
                token_times_s=[t - t0 for t in s],
            )
        )
    return done
