"""The token loop: batched prefill and decode over a transformers causal LM with a KV cache.

Left padding, attention masks and position ids follow transformers' `generate` (positions are the
cumulative mask minus one, 0 on padding), so greedy output matches it token for token.

`generate_ids` runs one static batch to the end. `RunningBatch` is the mechanism under the
continuous-batching scheduler: prefill a group of prompts, merge it into the decoding batch (KV
left-padded to a common width), decode one token for every row, drop rows that finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from finemoe.config import SamplingParams

if TYPE_CHECKING:
    from finemoe.graphs import StaticDecoder


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


def sample_tokens(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from float32 logits [B, V] (greedy or temperature/top-k/top-p sampling)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    # float64, shifted so the largest is 0: any temperature > 0 (even one float32 rounds to 0) then
    # sends the others to -inf, never a finite logit to +inf (softmax of two infinities is NaN)
    logits = logits.double().cpu()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
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


def sampling_generator(params: SamplingParams) -> torch.Generator | None:
    """A private CPU generator for sampled decoding (seeded when `params.seed` is set, else freshly
    seeded; the global RNG is untouched); None for greedy decoding."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    pad_id: int,
    stop_ids: set[int],
    device: torch.device,
    on_iteration: Callable[[int, bool, torch.Tensor, torch.Tensor], None] | None = None,
    static: StaticDecoder | None = None,
) -> list[Completion]:
    """Generate for a batch of token-id prompts of any lengths; returns one Completion each.

    `on_iteration(step, is_prefill, input_ids [B, T], live [B, T] bool CPU)` runs before each
    forward pass; `live` marks real tokens (not padding, not finished sequences). `static` runs a
    single prompt over its static KV cache (decode steps from CUDA graphs where it has them).
    """
    B = len(prompts)
    if static is not None and B == 1 and static.fits(len(prompts[0]) + params.max_new_tokens):
        static.reserve(len(prompts[0]) + params.max_new_tokens)
        with static.running():
            return _generate_static(static, prompts[0], params, stop_ids, device, on_iteration)
    width = max(len(p) for p in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, width]
    cache = DynamicCache(config=model.config)
    gen = sampling_generator(params)
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
        nxt = sample_tokens(logits, params, gen).tolist()
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
    return [_completion(prompts[i], out_tokens[i], finish[i], stamps[i], t0) for i in range(B)]


def _completion(prompt: list[int], tokens: list[int], finish: str, stamps: list[float], t0: float) -> Completion:
    """A finished sequence from its tokens and the perf_counter time each was ready (`t0`: the start)."""
    return Completion(
        prompt_token_ids=list(prompt),
        token_ids=tokens,
        finish_reason=finish or "length",
        ttft_s=stamps[0] - t0,
        tpot_s=(stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0,
        latency_s=stamps[-1] - t0,
        token_times_s=[t - t0 for t in stamps],
    )


def _generate_static(
    static: StaticDecoder,
    prompt: list[int],
    params: SamplingParams,
    stop_ids: set[int],
    device: torch.device,
    on_iteration: Callable[[int, bool, torch.Tensor, torch.Tensor], None] | None,
) -> list[Completion]:
    """`generate_ids` for one prompt over `static`'s cache (no padding, no attention mask)."""
    gen = sampling_generator(params)
    out: list[int] = []
    stamps: list[float] = []
    finish = ""
    t0 = time.perf_counter()
    inputs = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, T]
    live = torch.ones((1, len(prompt)), dtype=torch.bool)
    for step in range(params.max_new_tokens):
        if on_iteration is not None:
            with static.deferring_begin(step > 0):  # (a replayed step's predictors start after S_0's launch)
                on_iteration(step, step == 0, inputs, live)
        if step and params.greedy:  # (a replayed step's argmax taken in its last graph)
            tok = static.decode_token(len(prompt) + step - 1)
        else:
            logits = static.prefill(inputs) if step == 0 else static.decode(len(prompt) + step - 1)  # [1, V]
            tok = int(sample_tokens(logits, params, gen)[0])
        stamps.append(time.perf_counter())
        out.append(tok)
        if tok in stop_ids and not params.ignore_eos:
            finish = "stop"
            break
        if step + 1 < params.max_new_tokens:
            inputs = static.feed(tok)  # [1, 1]
            live = torch.ones((1, 1), dtype=torch.bool)
    return [_completion(prompt, out, finish, stamps, t0)]


# (input_ids [B, T] on the device, live [B, T] bool CPU) -> None; runs before each forward pass
BeforeForward = Callable[[torch.Tensor, torch.Tensor], None]


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, W] of prompts left-padded to the longest (W tokens)."""
    B, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class RunningBatch:
    """Sequences that decode together: one KV cache, left-padded to a common width W.

    `mask` [B, W] (long, on the device) marks the cached positions that hold real tokens. Every
    cache layer holds keys/values [B, heads, W, head_dim]; only plain `DynamicLayer`s can be
    merged and trimmed (`mergeable`), sliding-window layers keep their batch as it was prefilled.
    """

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def mergeable(self) -> bool:
        return _mergeable(self.cache)

    @staticmethod
    def can_merge(model: nn.Module) -> bool:
        """Whether batches of `model` can be merged and trimmed (no sliding-window cache layers)."""
        return _mergeable(DynamicCache(config=model.config))

    @classmethod
    @torch.inference_mode()
    def prefill(
        cls, model: nn.Module, prompts: list[list[int]], pad_id: int, device: torch.device, before: BeforeForward
    ) -> tuple[RunningBatch, torch.Tensor]:
        """Run the prompts' prefill pass; the new batch and the next-token logits [B, V] (float32)."""
        ids, mask = left_padded(prompts, pad_id, device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, W]
        cache = DynamicCache(config=model.config)
        before(ids, mask.cpu().bool())
        logits = _forward(model, ids, mask, pos, cache)
        return cls(cache, mask), logits

    @torch.inference_mode()
    def decode(self, model: nn.Module, tokens: list[int], before: BeforeForward) -> torch.Tensor:
        """Feed one token per row (`tokens` [B]); the next-token logits [B, V] (float32)."""
        device = self.mask.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1)  # [B, 1]
        pos = self.mask.sum(dim=-1, keepdim=True)  # [B, 1]: real tokens before this one
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)  # [B, W+1]
        before(ids, torch.ones((self.size, 1), dtype=torch.bool))
        return _forward(model, ids, self.mask, pos, self.cache)

    def merge(self, other: RunningBatch) -> None:
        """Append `other`'s rows after this batch's; the narrower one is left-padded (masked out)."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])

    def select(self, rows: list[int]) -> None:
        """Keep `rows` (batch indices, in this order); drop columns no kept row uses. `rows` non-empty."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)  # [B', W]
        start = int(mask.any(dim=0).int().argmax())  # first column a kept row uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))[..., start:, :]
            layer.values = layer.values.index_select(0, idx.to(layer.values.device))[..., start:, :]


def _mergeable(cache: DynamicCache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad `x` on the left of its sequence axis to `width`: masks [B, W] (axis -1) or KV
    tensors [B, heads, W, head_dim] (axis -2)."""
    axis = -1 if x.dim() == 2 else -2
    short = width - x.shape[axis]
    if short == 0:
        return x
    pad = (short, 0) if axis == -1 else (0, 0, short, 0)
    return torch.nn.functional.pad(x, pad)


def _forward(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
) -> torch.Tensor:
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1, :].to(dtype=torch.float32)  # [B, V]
