"""Routing traces: what a model's routers did on a set of prompts, for the simulator.

Format (version 1): one safetensors file. Each request ran alone (batch 1, greedy), so its rows
are its prefill tokens followed by one row per decode iteration. Tensors:

- `prompt_len` [R] int32, `output_len` [R] int32 (tokens generated = iterations run),
  `row_start` [R + 1] int64 (request r owns rows row_start[r] .. row_start[r+1]-1).
- `token_ids` [N] int32: the input token of each row (prompt tokens, then generated tokens).
- `probs` [N, L, E] float16 or float32: router probabilities over every routed expert.
- `topk` [N, L, k] int16: the experts the router selected.
- `spec1`, `spec2` [N, L, E] (optional): layer l+s's router applied to layer l's router input
  (what the speculative baselines see), zero where l+s >= L.
- `emb_table` [U, D] float32 and `emb_tokens` [U] int32 (sorted): the embedding-layer output of
  every token that occurs (the embedding of a row is a lookup by its token id).

String metadata: `format` = "finemoe-trace", `version` = "1", `model` (JSON `ModelIdentity`),
`geometry` (JSON: model_type, moe_layers, num_experts, top_k, expert parts, dtype),
`finemoe_version`, `prompts` (JSON list of per-request labels, e.g. workload ids).
A file that is not a trace, has another version, or is truncated is refused with `TraceError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finemoe.errors import FineMoEError
from finemoe.map_store_file import ModelIdentity, atomic_save
from finemoe.types import ExpertPart, IterationContext, MoESpec, PrefetchPlan, RoutingEvent

FORMAT = "finemoe-trace"
VERSION = "1"
SPEC_STRIDES = (1, 2)


class TraceError(FineMoEError):
    """A trace file that cannot be read."""


def spec_to_json(spec: MoESpec) -> str:
    return json.dumps(
        {
            "model_type": spec.model_type,
            "moe_layers": list(spec.moe_layers),
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "parts": [[p.name, list(p.shape)] for p in spec.parts],
            "dtype": str(spec.dtype).removeprefix("torch."),
            "num_decoder_layers": spec.num_decoder_layers,
            "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
        }
    )


def spec_from_json(text: str) -> MoESpec:
    g = json.loads(text)
    return MoESpec(
        g["model_type"],
        tuple(g["moe_layers"]),
        g["num_experts"],
        g["top_k"],
        g["hidden_size"],
        g["intermediate_size"],
        tuple(ExpertPart(n, tuple(s)) for n, s in g["parts"]),
        getattr(torch, g["dtype"]),
        g["num_decoder_layers"],
        g.get("shared_expert_intermediate_size", 0),
    )


@dataclass
class Trace:
    """A loaded (or freshly recorded) trace; see the module docstring for the tensors."""

    spec: MoESpec
    identity: ModelIdentity
    prompt_len: torch.Tensor  # [R] int32
    output_len: torch.Tensor  # [R] int32
    row_start: torch.Tensor  # [R + 1] int64
    token_ids: torch.Tensor  # [N] int32
    probs: torch.Tensor  # [N, L, E]
    topk: torch.Tensor  # [N, L, k] int16
    emb_table: torch.Tensor  # [U, D] float32
    emb_tokens: torch.Tensor  # [U] int32, sorted
    spec_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # stride -> [N, L, E]
    labels: list[str] = field(default_factory=list)
    finemoe_version: str = ""

    @property
    def num_requests(self) -> int:
        return int(self.prompt_len.numel())

    @property
    def num_rows(self) -> int:
        return int(self.token_ids.numel())

    def rows(self, request: int, iteration: int) -> tuple[int, int]:
        """Row range [a, b) of `request`'s iteration `iteration` (0 = prefill)."""
        start, plen = int(self.row_start[request]), int(self.prompt_len[request])
        if iteration == 0:
            return start, start + plen
        a = start + plen + iteration - 1
        return a, a + 1

    def row_ranges(self, request: int) -> list[tuple[int, int]]:
        """`rows(request, it)` of each of `request`'s iterations, in order (one tensor read each
        of its start, prompt and output lengths)."""
        start, plen, n = int(self.row_start[request]), int(self.prompt_len[request]), int(self.output_len[request])
        a = start + plen
        return [(start, a)] + [(r, r + 1) for r in range(a, a + n - 1)] if n > 0 else []

    def embeddings(self, a: int, b: int) -> torch.Tensor:
        """Embedding-layer outputs of rows [a, b): [b - a, D] float32."""
        idx = torch.searchsorted(self.emb_tokens, self.token_ids[a:b])
        return self.emb_table[idx]

    def layer_steps(self) -> int:
        """Token-layer steps of a batch-1 replay: (prefill iterations + decode iterations) x L."""
        return int(self.output_len.sum()) * self.spec.num_layers

    def head(self, n: int) -> Trace:
        """The first `n` requests (all of them if the trace has fewer)."""
        return self.subset(list(range(min(n, self.num_requests))))

    def subset(self, requests: list[int]) -> Trace:
        """A trace of the given requests (in that order); shares the embedding table."""
        bad = [r for r in requests if not 0 <= r < self.num_requests]
        if bad:
            raise TraceError(f"the trace has requests 0..{self.num_requests - 1}; asked for {bad[:5]}")
        parts = [(int(self.row_start[r]), int(self.row_start[r + 1])) for r in requests]
        idx = torch.cat([torch.arange(a, b) for a, b in parts]) if parts else torch.zeros(0, dtype=torch.long)
        lens = torch.tensor([b - a for a, b in parts], dtype=torch.int64)
        starts = torch.zeros(len(parts) + 1, dtype=torch.int64)
        starts[1:] = lens.cumsum(0)
        sel = torch.tensor(requests, dtype=torch.long)
        return Trace(
            self.spec,
            self.identity,
            self.prompt_len[sel],
            self.output_len[sel],
            starts,
            self.token_ids[idx],
            self.probs[idx],
            self.topk[idx],
            self.emb_table,
            self.emb_tokens,
            {s: t[idx] for s, t in self.spec_probs.items()},
            [self.labels[r] for r in requests] if self.labels else [],
            self.finemoe_version,
        )

    def with_layers(self, num_layers: int) -> Trace:
        """The trace as a model of `num_layers` MoE layers would replay it: layer l is trace layer
        l mod L (the mapping of `trace_routing.TraceRouting`). Shares nothing it changes."""
        import dataclasses

        idx = torch.arange(num_layers) % self.spec.num_layers
        spec = dataclasses.replace(self.spec, moe_layers=tuple(range(num_layers)), num_decoder_layers=num_layers)
        return dataclasses.replace(
            self,
            spec=spec,
            probs=self.probs[:, idx],
            topk=self.topk[:, idx],
            spec_probs={s: t[:, idx] for s, t in self.spec_probs.items()},
        )

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (`map_store_file.atomic_save`)."""
        from finemoe import __version__

        tensors = {
            "prompt_len": self.prompt_len.int().contiguous(),
            "output_len": self.output_len.int().contiguous(),
            "row_start": self.row_start.long().contiguous(),
            "token_ids": self.token_ids.int().contiguous(),
            "probs": self.probs.contiguous(),
            "topk": self.topk.short().contiguous(),
            "emb_table": self.emb_table.float().contiguous(),
            "emb_tokens": self.emb_tokens.int().contiguous(),
        }
        for s, t in self.spec_probs.items():
            tensors[f"spec{s}"] = t.contiguous()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": json.dumps(asdict(self.identity)),
            "geometry": spec_to_json(self.spec),
            "finemoe_version": __version__,
            "prompts": json.dumps(self.labels),
        }
        atomic_save(path, tensors, meta)


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace file; raises `TraceError` with what is wrong and how to fix it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    hint = f"record it again with `finemoe trace record --out {path}`"
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist (record one with `finemoe trace record --out {path}`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise TraceError(f"{path} is not a finemoe trace ({hint})")
            if meta.get("version") != VERSION:
                raise TraceError(f"{path} is a version {meta.get('version')} trace; finemoe reads version {VERSION}")
            names = set(f.keys())
            t = {k: f.get_tensor(k) for k in names}
            spec = spec_from_json(meta["geometry"])
            identity = ModelIdentity(**json.loads(meta["model"]))
            labels = json.loads(meta.get("prompts", "[]"))
    except TraceError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise TraceError(
            f"{path} cannot be read as a finemoe trace: it is truncated or corrupt, or another kind of file "
            f"({e}); if it was a trace, {hint}"
        ) from e
    need = ("prompt_len", "output_len", "row_start", "token_ids", "probs", "topk", "emb_table", "emb_tokens")
    missing = [k for k in need if k not in t]
    if missing:
        raise TraceError(f"{path} lacks tensors {missing}; {hint}")
    L, E, k = spec.num_layers, spec.num_experts, spec.top_k
    R, N = t["prompt_len"].numel(), t["token_ids"].numel()
    ok = (
        t["output_len"].numel() == R
        and t["row_start"].numel() == R + 1
        and int(t["row_start"][-1]) == N
        and t["probs"].shape == (N, L, E)
        and t["topk"].shape == (N, L, k)
        and bool(
            (t["row_start"][1:] - t["row_start"][:-1] == t["prompt_len"].long() + t["output_len"].long() - 1).all()
        )
        and t["emb_table"].dim() == 2
        and t["emb_table"].shape[0] == t["emb_tokens"].numel()
        and t["emb_table"].shape[1] == identity.embedding_dim
    )
    spec_probs = {s: t[f"spec{s}"] for s in SPEC_STRIDES if f"spec{s}" in t}
    ok = ok and all(v.shape == (N, L, E) for v in spec_probs.values())
    if not ok:
        raise TraceError(f"{path} is inconsistent: tensor shapes do not match its header; {hint}")
    return Trace(
        spec,
        identity,
        t["prompt_len"],
        t["output_len"],
        t["row_start"].long(),
        t["token_ids"],
        t["probs"],
        t["topk"].long(),
        t["emb_table"],
        t["emb_tokens"],
        spec_probs,
        labels,
        meta.get("finemoe_version", ""),
    )


class TraceRecorder:
    """A predictor that never plans: records each iteration's routing (batch-1 requests only).

    Added to an engine with `Engine.add_predictor`; `finish(prompt_ids, output_ids, label)` closes
    a request. `gate` runs a later router on a router input (for the speculative columns).
    """

    name = "trace-recorder"
    wants_embeddings = False
    wants_hidden = True

    def __init__(self, spec: MoESpec, gate: Any, dtype: torch.dtype = torch.float16) -> None:
        self.spec, self.gate, self.dtype = spec, gate, dtype
        self._layers: list[torch.Tensor] = []  # per layer of this iteration: probs [T, E]
        self._topk: list[torch.Tensor] = []
        self._spec: dict[int, list[torch.Tensor]] = {s: [] for s in SPEC_STRIDES}
        self._rows: list[tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]] = []  # per iteration
        self.requests: list[tuple[int, int, list[int], str]] = []  # (prompt_len, output_len, tokens, label)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]] = []

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        if ctx.batch_size != 1:
            raise RuntimeError("the trace recorder runs requests one at a time (batch 1)")
        self._flush_iteration()
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        L = self.spec.num_layers
        self._layers.append(event.host_probs().to(self.dtype))
        self._topk.append(event.topk_ids.short())
        for s in SPEC_STRIDES:
            if event.layer + s < L and event.hidden is not None:
                self._spec[s].append(self.gate(event.layer + s, event.hidden).to(self.dtype))
            else:
                self._spec[s].append(torch.zeros_like(self._layers[-1]))
        return None

    def _flush_iteration(self) -> None:
        if self._layers:
            probs = torch.stack(self._layers, dim=1)  # [T, L, E]
            topk = torch.stack(self._topk, dim=1)  # [T, L, k]
            spec = {s: torch.stack(v, dim=1) for s, v in self._spec.items() if v}
            self._rows.append((probs, topk, spec))
        self._layers, self._topk = [], []
        self._spec = {s: [] for s in SPEC_STRIDES}

    def end_requests(self) -> None:
        self._flush_iteration()

    def finish(self, prompt_ids: list[int], output_ids: list[int], label: str) -> None:
        """The request that just ran is complete; its iterations become trace rows."""
        self._flush_iteration()
        rows, self._rows = self._rows, []
        if len(rows) != len(output_ids):
            raise RuntimeError(f"recorded {len(rows)} iterations for {len(output_ids)} generated tokens")
        self.chunks.extend(rows)
        self.requests.append((len(prompt_ids), len(output_ids), list(prompt_ids) + list(output_ids[:-1]), label))

    def stats(self) -> dict[str, Any]:
        return {"trace_requests": len(self.requests)}

    def build(self, identity: ModelIdentity, embed: Any) -> Trace:
        """The trace of every finished request; `embed` maps token ids [U] to embeddings [U, D]."""
        if not self.requests:
            raise TraceError("no request was recorded")
        plen = torch.tensor([r[0] for r in self.requests], dtype=torch.int32)
        olen = torch.tensor([r[1] for r in self.requests], dtype=torch.int32)
        starts = torch.zeros(len(self.requests) + 1, dtype=torch.int64)
        starts[1:] = (plen.long() + olen.long() - 1).cumsum(0)
        tokens = torch.tensor([t for r in self.requests for t in r[2]], dtype=torch.int32)
        uniq = torch.unique(tokens)  # sorted
        with torch.no_grad():
            table = embed(uniq.long()).float().cpu()
        spec = {
            s: torch.cat([c[2][s] for c in self.chunks]) for s in SPEC_STRIDES if all(s in c[2] for c in self.chunks)
        }
        return Trace(
            self.spec,
            identity,
            plen,
            olen,
            starts,
            tokens,
            torch.cat([c[0] for c in self.chunks]),
            torch.cat([c[1] for c in self.chunks]).long(),
            table,
            uniq.int(),
            spec,
            [r[3] for r in self.requests],
        )


def record(
    engine: Any,
    prompts: list[str | list[int]],
    max_new_tokens: int,
    labels: list[str] | None = None,
    dtype: torch.dtype = torch.float16,
    progress: Any = None,
) -> Trace:
    """Run `prompts` one at a time (greedy, `max_new_tokens` each, no early stop) through
    `engine` and return their trace. `progress(done, total)` is called after each request."""
    from finemoe.config import SamplingParams

    rec = TraceRecorder(engine.spec, engine.gate, dtype)
    engine.add_predictor(rec)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    labels = labels or [str(i) for i in range(len(prompts))]
    for i, (p, label) in enumerate(zip(prompts, labels, strict=True)):
        out = engine.generate(p, params)[0]
        rec.finish(out.prompt_token_ids, out.token_ids, label)
        if progress is not None:
            progress(i + 1, len(prompts))
    return rec.build(engine.identity(), engine.model.get_input_embeddings())
