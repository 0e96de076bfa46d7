"""Benchmark-only routing replay: make a model's routers choose what a recorded trace chose.

Random-weight models of real shapes route unrealistically (nearly uniformly, or very
predictably); a benchmark can instead replay the routing of a trained model recorded with
`finemoe trace record`. A forward hook, *prepended* to each router's hooks so that finemoe's own
router hook, the predictors and the experts all see the replayed choice, replaces the router's
output: the top-k ids are the trace's, the logits are the log of the trace's probabilities (so the
router's softmax gives them back) and the top-k weights are those probabilities renormalised.
Nothing else changes, so timings stay those of the model; outputs are meaningless and every
record made with it must say `routing: trace`.

Geometry: the trace's experts per layer and top-k must equal the model's; MoE layer l replays
trace layer l mod L_trace (say so when L differs). Batch 1: each forward pass is the next
iteration of the current request (prefill = the recorded prompt length).
"""

from __future__ import annotations

import torch
from torch import nn

from finemoe.errors import ConfigError
from finemoe.loader import find_moe_layers
from finemoe.models import get_adapter
from finemoe.trace import Trace

MIN_PROB = 1e-9  # floor before the log: experts the trace gave probability 0 stay finite


class TraceRouting:
    """Hooks on every MoE router of `model` replaying `trace` (see the module docstring).

    Use `start(request)` before generating for a request, with a prompt of `prompt_len(request)`
    tokens and at most `output_len(request)` new tokens; `remove()` takes the hooks away.
    """

    def __init__(self, model: nn.Module, trace: Trace) -> None:
        self.trace = trace
        self.adapter = get_adapter(model.config.model_type)
        refs = find_moe_layers(model, self.adapter)
        E = refs[0].experts.gate_up_proj.shape[0]
        k = int(getattr(model.config, "num_experts_per_tok", trace.spec.top_k))
        if (E, k) != (trace.spec.num_experts, trace.spec.top_k):
            raise ConfigError(
                f"trace routing needs the same experts and top-k: the trace has {trace.spec.num_experts} "
                f"experts top-{trace.spec.top_k}, the model {E} top-{k}; record a trace of a reference model "
                f"with that geometry (finemoe reference build --geometry {E}x{k})"
            )
        self.num_layers = len(refs)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        weight = next(refs[0].router.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self._base, self._staged = 0, None
        self.trace_layers = trace.spec.num_layers
        self.request, self.iteration = 0, 0
        self._routed: tuple[int, int, int] = (-1, 0, 0)  # (model layer, row a, row b) last replayed
        self.handles = [ref.router.register_forward_hook(self._hook(i), prepend=True) for i, ref in enumerate(refs)]

    @property
    def layer_map(self) -> str:
        if self.num_layers == self.trace_layers:
            return "identity"
        return f"model MoE layer l replays trace layer l mod {self.trace_layers}"

    def prompt_len(self, request: int) -> int:
        return int(self.trace.prompt_len[request])

    def prompt_ids(self, request: int) -> list[int]:
        """The recorded prompt's token ids (the traced model's tokenizer; benchmarks feed them to a
        model of another vocabulary so that equal prompts embed equally), folded modulo the model's
        vocabulary when it is smaller than the traced one (e.g. Mixtral's 32,000 ids)."""
        start = int(self.trace.row_start[request])
        ids = self.trace.token_ids[start : start + self.prompt_len(request)]
        return (ids % self.vocab_size).tolist()

    def output_len(self, request: int) -> int:
        return int(self.trace.output_len[request])

    def start(self, request: int) -> None:
        """Replay `request` from its prefill on. Its routing is staged on the routers' device now,
        so the hooks only slice device tensors: no host-device copy (and no synchronisation) in
        the forward pass, which would otherwise serialise CPU and GPU work of every layer."""
        if not 0 <= request < self.trace.num_requests:
            raise ConfigError(f"the trace has {self.trace.num_requests} requests; got request {request}")
        self.request, self.iteration = request, 0
        a, b = int(self.trace.row_start[request]), int(self.trace.row_start[request + 1])
        probs = self.trace.probs[a:b].float()  # [N_r, L_t, E]
        top = self.trace.topk[a:b].long()  # [N_r, L_t, k]
        weights = probs.gather(2, top)
        weights = weights / weights.sum(dim=2, keepdim=True).clamp_min(MIN_PROB)
        self._base = a
        self._staged = (  # layer-major [L_t, N_r, *]: a layer's rows are one contiguous block
            probs.clamp_min(MIN_PROB).log().transpose(0, 1).contiguous().to(self.device, self.dtype),
            top.transpose(0, 1).contiguous().to(self.device),
            weights.transpose(0, 1).contiguous().to(self.device, self.dtype),
        )

    def _hook(self, layer: int):
        trace, last = self.trace, self.num_layers - 1
        lt = layer % self.trace_layers
        logits_at, index_at = self.adapter.router_logits_at, self.adapter.router_index_at

        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            if output[index_at].is_cuda and torch.cuda.is_current_stream_capturing():
                return None  # a graphed decode step being recorded: its replays run this hook on static outputs
            if self._staged is None:
                raise ConfigError("trace routing: call start(request) before generating")
            if self.iteration >= int(trace.output_len[self.request]):
                raise ConfigError(
                    f"request {self.request} of the trace has {int(trace.output_len[self.request])} iterations; "
                    "generate at most output_len(request) tokens"
                )
            a, b = trace.rows(self.request, self.iteration)
            logits, idx = output[logits_at], output[index_at]
            n_tok = idx.shape[0]
            if n_tok != b - a:
                raise ConfigError(
                    f"trace routing replays batch-1 requests: this forward pass routes {n_tok} tokens, the trace's "
                    f"iteration {self.iteration} of request {self.request} has {b - a} (use prompt_len(request))"
                )
            logp, top, weights = self._staged
            r0, r1 = a - self._base, b - self._base
            out = list(output)
            out[logits_at] = logp[lt, r0:r1].to(logits.dtype).view_as(logits)  # [T, E]
            out[index_at] = top[lt, r0:r1].to(idx.dtype)  # [T, k]
            for i, t in enumerate(output):  # the top-k weights: the remaining [T, k] tensor
                if i not in (logits_at, index_at) and isinstance(t, torch.Tensor) and t.shape == idx.shape:
                    out[i] = weights[lt, r0:r1].to(t.dtype)
            self._routed = (layer, a, b)
            if layer == last:
                self.iteration += 1
            return tuple(out)

        return hook

    def gate(self, target: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Speculative router outputs replayed from the trace (`Engine.speculative_gate`): what the
        traced model's router of layer `target` gave on the router input of the layer just routed
        (`spec<s>` tensors, s = target - that layer). `hidden` [T, H] is only counted.
        Returns probabilities [T, E] float32 on the CPU, or None where the trace has none (a
        stride it did not record, or a target past its last layer): no speculative plan there."""
        source, a, b = self._routed
        s = target - source
        table = self.trace.spec_probs.get(s)
        if source < 0 or table is None or source % self.trace_layers + s >= self.trace_layers:
            return None
        if b - a != hidden.shape[0]:
            raise ConfigError(f"speculative gate asked for {hidden.shape[0]} rows; the routed iteration has {b - a}")
        return table[a:b, source % self.trace_layers].float()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
