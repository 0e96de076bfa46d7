"""The engine: loads a checkpoint with its experts offloaded, wires cache, transfer, prefetcher
and predictor into the model, and generates. Orchestration only."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from finemoe import map_store_file
from finemoe.async_search import AsyncPredictor
from finemoe.baselines import RequestMatrixStore, SpeculativeGatePredictor
from finemoe.cache import ExpertCache
from finemoe.checkpoint import Checkpoint
from finemoe.config import BudgetPlan, EngineConfig, ExpertBudget, SamplingParams, format_bytes
from finemoe.device_plans import DeviceMatches, DevicePlanner
from finemoe.duty import PredictionDuty, duty_applies
from finemoe.errors import ConfigError
from finemoe.execution import Attachment
from finemoe.expert_map import ExpertMapStore, StoreGeometry
from finemoe.fine_predictor import FineMoEPredictor
from finemoe.gate import RouterGate
from finemoe.generation import generate_ids
from finemoe.graphs import StaticDecoder, static_decode_supported
from finemoe.history import HistoryRecorder, PredictorChain
from finemoe.loader import (
    CheckpointExperts,
    ModuleExperts,
    build_skeleton,
    build_spec,
    find_moe_layers,
    load_dense,
)
from finemoe.models import FamilyAdapter, get_adapter
from finemoe.policy import EVICTION_POLICIES
from finemoe.pool import SlotPool
from finemoe.predictor import PredictorDeps
from finemoe.prefetcher import LinkWindow, Prefetcher
from finemoe.presets import (
    adaptive_prefetch_window,
    get_preset,
    predict_after_demand,
    predictor_members,
    prefetch_distance,
    prefill_sweep,
    reads_router_inputs,
    records_requests,
)
from finemoe.process_search import ProcessPredictor, worker_setup
from finemoe.runtime import OffloadRuntime
from finemoe.store import ExpertStore
from finemoe.telemetry import EngineTelemetry, GenerationOutput
from finemoe.threads import warn_if_oversubscribed
from finemoe.transfer import make_transfer
from finemoe.types import MoESpec

log = logging.getLogger(__name__)


Prompt = str | list[int] | list[dict[str, str]]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return dev


class Engine(EngineTelemetry):
    """A MoE model whose routed experts live in host memory, cached in a device slot pool."""

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        spec: MoESpec,
        store: ExpertStore,
        config: EngineConfig,
        device: torch.device,
        tokenizer: Any = None,
        dense_bytes: int = 0,
        name: str = "",
    ) -> None:
        self.model, self.adapter, self.spec, self.store = model, adapter, spec, store
        self.device, self.tokenizer, self.name = device, tokenizer, name
        self.dense_bytes = dense_bytes
        self._attachment: Attachment | None = None
        self.static: StaticDecoder | None = None  # config.cuda_graphs: single prompts over a static KV cache
        self._iterations = 0
        self.serving = False  # a continuous-batching scheduler owns the forward passes
        self._closed = False
        self.async_predictors: list[AsyncPredictor | ProcessPredictor] = []
        # The prediction duty of each configuration run so far (keyed by the whole config): a
        # `reconfigure` back to one resumes its measurements instead of comparing the arms afresh.
        self._duties: dict[EngineConfig, PredictionDuty] = {}
        # Replay hook (benchmarks): a `gate(layer, hidden [T, H]) -> probs [T, E]` used by the
        # speculative predictors instead of the model's routers; applies from the next reconfigure.
        self.speculative_gate: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None
        self.maps, self.requests = self._history_stores(config)
        warn_if_oversubscribed()
        self._setup(config)

    # -- history (expert maps, past requests) ----------------------------------------------------
    def identity(self) -> map_store_file.ModelIdentity:
        emb = self.model.get_input_embeddings().weight
        return map_store_file.ModelIdentity(
            self.spec.model_type,
            self.spec.num_layers,
            self.spec.num_experts,
            self.spec.top_k,
            int(emb.shape[1]),
            map_store_file.embedding_fingerprint(emb),
        )

    def _history_stores(self, config: EngineConfig) -> tuple[ExpertMapStore, RequestMatrixStore]:
        """Empty stores, or the ones saved in `config.map_store` (refused if they do not fit)."""
        spec = self.spec
        dim = int(self.model.get_input_embeddings().weight.shape[1])
        maps = ExpertMapStore(StoreGeometry(spec.num_layers, spec.num_experts, dim), config.map_store_capacity)
        requests = RequestMatrixStore(spec.num_layers, spec.num_experts, config.map_store_capacity)
        if config.map_store and os.path.exists(config.map_store):
            saved = map_store_file.load(config.map_store, self.identity())
            maps.load_rows(saved.emb, saved.maps)
            requests.load_rows(saved.eams)
            log.info("map store %s: %d expert maps, %d past requests", config.map_store, maps.size, requests.size)
        return maps, requests

    def save_map_store(self, path: str | os.PathLike | None = None) -> None:
        """Write the history stores to `path` (default: the configured `map_store`), atomically."""
        path = path or self.config.map_store
        if not path:
            raise ConfigError("no map store path given")
        for ap in self.async_predictors:
            ap.flush()
            if isinstance(ap, ProcessPredictor) and not ap.pull_stores(self.maps, self.requests):
                # the worker learned into its own copies; without them the file would go back in time
                log.error("map store not saved to %s: the search process's stores could not be read back", path)
                return
        contents = map_store_file.MapStoreContents(
            self.maps.state()["emb"], self.maps.state()["maps"], self.requests.state()["eams"]
        )
        if self.config.map_store_learn and not records_requests(self.preset, self.config):
            log.info(
                "this configuration records no past requests (policy %s, record_requests=%s; auto keeps them for "
                "moe-infinity or a map_store file): %s gets the %d the store holds",
                self.config.policy,
                self.config.record_requests,
                path,
                self.requests.size,
            )
        map_store_file.save(path, self.identity(), contents)
        log.info("saved %d expert maps and %d past requests to %s", self.maps.size, self.requests.size, path)

    def _gate(self, refs: list) -> RouterGate:
        """Run MoE layer l's router on any hidden state (hooks bypassed): probabilities [T, E] on the CPU."""
        return RouterGate([r.router for r in refs], self.adapter, self.spec.num_experts)

    def _setup(self, config: EngineConfig) -> None:
        """Build pool, cache, prefetcher and predictors for `config` and attach to the model."""
        spec, device = self.spec, self.device
        preset = get_preset(config.policy)
        budget = ExpertBudget("fraction", 1.0) if preset.all_resident else config.expert_budget
        plan = BudgetPlan.make(budget, spec)
        self.config, self.preset, self.plan = config, preset, plan
        pool = SlotPool(spec, plan.slots, device)
        transfer = make_transfer(pool)
        graphs = config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"
        # decode steps replayed from CUDA graphs (else eager: no CUDA, or sliding-window attention)
        graphed = graphs and device.type == "cuda" and static_decode_supported(self.model)
        # (auto: the absent experts gathered where graphed decode runs ahead of the syncs they save)
        gather = config.gather_absent if config.gather_absent is not None else graphed
        self.cache = ExpertCache(
            spec,
            pool,
            self.store,
            transfer,
            EVICTION_POLICIES[config.eviction or preset.eviction](spec.num_layers, spec.num_experts),
            prefill_sweep=prefill_sweep(preset, config),
            early_issue_misses=config.early_issue_misses,
            keep_whole=config.keep_whole_layers,
            gather_absent=gather,
        )
        # Link-aware prefetch window: layer time is host wall time less the time blocked in the
        # routing syncs (which absorb copy stalls), per-expert copy time as the transfer measures it.
        # Graphed decode steps count the syncs: there they wait mostly for the GPU's own work.
        window = LinkWindow(
            config.max_inflight_prefetches,
            lambda: time.perf_counter() - (self.runtime.sync_s if self.runtime.late_events is None else 0.0),
            transfer.copy_seconds,
            adaptive=adaptive_prefetch_window(preset, config, plan.all_resident),
        )
        self.prefetcher = Prefetcher(self.cache, config.max_inflight_prefetches, window, config.prefetch_copies)
        refs = find_moe_layers(self.model, self.adapter)
        self.distance = prefetch_distance(preset, config.prefetch_distance)
        self.maps.distance = self.distance
        self.search_mode = "sync"
        predictors = []
        self.gate = self.speculative_gate or self._gate(refs)
        deps = PredictorDeps(
            spec,
            self.distance,
            self.maps,
            self.requests,
            self.gate,
            delta_rule=config.delta_rule,
            semantic=config.semantic_search,
            map_values=config.map_values,
            trajectory_window=config.trajectory_window,
            trajectory_candidates=config.trajectory_candidates,
            trajectory_lag=config.trajectory_lag,
            map_min_score=config.map_min_score,
            map_min_precision=config.map_min_precision,
            store_rows=config.map_store_rows,
            layer_probs=getattr(self.cache.policy, "reads_layer_probs", True),
        )
        members = predictor_members(preset, config, deps, plan.all_resident)
        search = self._search_mode(config, members, device, graphed)  # ("auto" resolved)
        duty = bool(members) and duty_applies(
            config.prediction_duty, device.type, config.search, preset.adaptive_duty, plan.all_resident
        )
        always: list = []  # predictors the duty never pauses
        if members and preset.asynchronous and config.search == "process":
            # the map predictor and the recorder in a worker process; speculative gates (they read
            # the model's routers) stay on the forward thread, after it in the chain
            setup = worker_setup(config, deps, plan.all_resident, self.maps, self.requests)
            remote = ProcessPredictor(setup, self.prefetcher.post)
            self.async_predictors.append(remote)
            self.search_mode = "process"
            local = [m for m in members if isinstance(m, SpeculativeGatePredictor)]
            members = [remote, *local]
            predictors.append(members[0] if len(members) == 1 else PredictorChain(members))
        elif duty:
            # inline search with the adaptive duty: the recorder stays outside the planners' chain
            # (called right after it, as in the chain), so paused iterations are still recorded
            planners = [m for m in members if not isinstance(m, HistoryRecorder)]
            always = [m for m in members if isinstance(m, HistoryRecorder)]
            predictors.append(planners[0] if len(planners) == 1 else PredictorChain(planners))
            predictors.extend(always)
        elif members:
            pred = members[0] if len(members) == 1 else PredictorChain(members)
            # "auto" searches in the forward pass: on the H200 the searcher thread's GIL contention
            # cost more step time than the search itself (docs/results/policies.md, overhead).
            if preset.asynchronous and config.search == "async":
                pred = AsyncPredictor(pred, self.prefetcher.post)
                self.async_predictors.append(pred)
                self.search_mode = "async"
            predictors.append(pred)
        self.runtime = OffloadRuntime(spec, self.adapter, self.cache, self.prefetcher, predictors)
        self.runtime.predict_after_demand = predict_after_demand(preset, config)
        if duty:
            self.runtime.duty, self.runtime.always = self._duty_for(config), always
        if hasattr(self.cache.policy, "on_routing") and not plan.all_resident:
            self.runtime.policy_routes = self.cache.policy.on_routing  # router-probability eviction
        self.runtime.embed = self.model.get_input_embeddings()
        if self.search_mode not in ("async", "process"):  # (a searcher reads events after the step's end)
            self.runtime.map_recorders = [
                m for m in members if isinstance(m, HistoryRecorder) and m.maps is not None and m.values == "probs"
            ]
        self.runtime.want_hidden = reads_router_inputs(preset, config) and not plan.all_resident
        # (auto: the gates computed in the side graphs where the map search runs there too)
        auto_gates = search == "device" and graphed
        graph_gates = config.graph_gates if config.graph_gates is not None else auto_gates
        if self.runtime.want_hidden and isinstance(self.gate, RouterGate) and graph_gates:
            # a graphed decode step computes these gates' probabilities itself (not a replaced gate's)
            strides = {m.stride for m in members if isinstance(m, SpeculativeGatePredictor)}
            self.runtime.gate_strides, self.runtime.router_gate = tuple(sorted(strides)), self.gate
            self.runtime.lazy_gate_rows = self.search_mode != "async"  # (a searcher thread keeps events)
        self.runtime.want_embeddings = any(isinstance(m, HistoryRecorder) for m in members) or (
            preset.predictor == "finemoe"
        )
        if plan.all_resident:
            self.cache.preload_all()
            transfer.synchronize()
        elif config.warm_pool or (config.warm_pool is None and graphed):  # (auto: where decode is graphed)
            free = self.cache.num_slots - self.cache.resident_count()
            quiet = not config.progress
            with tqdm(total=free, desc="warming the pool", unit="expert", disable=quiet, leave=False) as bar:
                n = self.cache.fill_free(bar.update)
                transfer.synchronize()
            log.info("warm pool: %d experts loaded into free slots", n)
        self._attachment = Attachment(self.model, self.runtime, refs)
        self.static = StaticDecoder(self.model, self.runtime, refs, device) if graphs else None
        if search == "device":
            self._device_search(config, members, device, graphed)
        log.info(
            "engine ready: %s, policy %s, %d of %d experts in slots (%s of %s), device %s",
            spec.model_type,
            preset.name,
            plan.slots,
            spec.num_total_experts,
            format_bytes(plan.pool_bytes),
            format_bytes(spec.total_expert_bytes),
            device,
        )

    def _duty_for(self, config: EngineConfig) -> PredictionDuty:
        """The duty `config` ran with before (its arm medians and phase carried over a
        `reconfigure`), or a new one."""
        duty = self._duties.pop(config, None)
        if duty is None:
            duty = PredictionDuty()
            while len(self._duties) >= 32:  # a sweep over many configurations: forget the oldest
                self._duties.pop(next(iter(self._duties)))
        else:
            duty.resume()
        self._duties[config] = duty
        return duty

    def add_predictor(self, predictor: Any) -> None:
        """Run `predictor` on the forward thread next to the policy's (e.g. a `TraceRecorder`);
        it lasts until the next `reconfigure`. Its `wants_hidden` / `wants_embeddings` attributes
        ask for router inputs / embedding-layer outputs."""
        self.runtime.predictors.append(predictor)
        self.runtime.always.append(predictor)  # the prediction duty never pauses it
        self.runtime.want_hidden |= bool(getattr(predictor, "wants_hidden", False))
        self.runtime.extra_hidden |= bool(getattr(predictor, "wants_hidden", False))
        self.runtime.want_embeddings |= bool(getattr(predictor, "wants_embeddings", False))

    def reconfigure(self, **overrides: Any) -> None:
        """Switch policy, budget or prefetch settings without reloading: the host store is kept,
        the device pool is rebuilt (empty, or full for an all-resident plan)."""
        if self.serving:
            raise ConfigError("this engine is being served by a scheduler; stop it before reconfiguring")
        if "expert_budget" in overrides:
            overrides["expert_budget"] = ExpertBudget.parse(overrides["expert_budget"])
        config = EngineConfig(**{**self.config.__dict__, **overrides})
        get_preset(config.policy)
        if not get_preset(config.policy).all_resident:
            BudgetPlan.make(config.expert_budget, self.spec)
        old = self.config
        self._detach()
        try:
            self._setup(config)
        except BaseException:
            self._setup(old)  # e.g. the new pool did not fit: keep serving with the old settings
            raise

    def _detach(self) -> None:
        self.maps.apply_pending()  # (a graphed step's insert held back: made under the settings it ran with)
        for ap in self.async_predictors:
            ap.flush()
            if isinstance(ap, ProcessPredictor):  # keep what the worker learned for the next setup
                ap.pull_stores(self.maps, self.requests)
            ap.close()
        self.async_predictors = []
        self.static = None  # its graphs read the pool and the slot table being released
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
            self.cache.transfer.synchronize()
            self.cache.pool.release()
            self.runtime.release()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: EngineConfig | None = None, **kwargs: Any) -> Engine:
        """Load `path` (a local checkpoint directory) with experts offloaded.

        Keyword arguments override fields of `EngineConfig` (expert_budget accepts '25%', '8GiB'
        or a slot count).
        """
        if "expert_budget" in kwargs:
            kwargs["expert_budget"] = ExpertBudget.parse(kwargs["expert_budget"])
        config = EngineConfig(**{**(config.__dict__ if config else {}), **kwargs})
        get_preset(config.policy)
        device = _resolve_device(config.device)
        ckpt = Checkpoint(path)
        try:
            dtype = getattr(torch, config.dtype) if config.dtype else _default_dtype(ckpt.floating_dtype(), device)
            model, adapter = build_skeleton(ckpt, dtype)
            spec = build_spec(model, adapter, dtype)
            if not get_preset(config.policy).all_resident:
                BudgetPlan.make(config.expert_budget, spec)  # refuse a bad budget before reading weights
            experts = CheckpointExperts(ckpt, adapter, spec)
            refs = find_moe_layers(model, adapter)
            dense = load_dense(model, ckpt, adapter, experts.consumed, {r.experts for r in refs}, device, dtype)
            store = ExpertStore(spec, pin=device.type == "cuda")
            store.fill(experts, progress=config.progress)
        finally:
            ckpt.close()
        return cls(model, adapter, spec, store, config, device, _load_tokenizer(ckpt.path), dense, str(ckpt.path))

    @staticmethod
    def inspect(path: str | os.PathLike, expert_budget: str | int | float = "50%", dtype: str | None = None) -> dict:
        """What a budget means for a checkpoint, without reading any weights (a dry run).

        Validates the directory, shards and family like `from_pretrained`; raises the same errors.
        """
        budget = ExpertBudget.parse(expert_budget)
        ckpt = Checkpoint(path)
        torch_dtype = getattr(torch, dtype) if dtype else ckpt.floating_dtype()
        model, adapter = build_skeleton(ckpt, torch_dtype)
        spec = build_spec(model, adapter, torch_dtype)
        experts = CheckpointExperts(ckpt, adapter, spec)
        dense = sum(
            (info.end - info.start) // info.dtype.itemsize * torch_dtype.itemsize
            for key, info in ckpt.tensors.items()
            if key not in experts.consumed
        )
        plan = BudgetPlan.make(budget, spec)
        return {
            "path": str(ckpt.path),
            "family": adapter.display_name,
            "model_type": spec.model_type,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "moe_layers": spec.num_layers,
            "decoder_layers": spec.num_decoder_layers,
            "experts_per_layer": spec.num_experts,
            "top_k": spec.top_k,
            "expert_bytes": spec.expert_bytes,
            "total_expert_bytes": spec.total_expert_bytes,
            "dense_bytes": dense,
            "budget": str(budget),
            "slots": plan.slots,
            "pool_bytes": plan.pool_bytes,
            "all_resident": plan.all_resident,
            "device_bytes": dense + plan.pool_bytes,
        }

    @classmethod
    def from_model(
        cls, model: nn.Module, config: EngineConfig | None = None, tokenizer: Any = None, **kwargs: Any
    ) -> Engine:
        """Offload the experts of an already materialised transformers MoE model (takes ownership:
        its fused expert tensors are moved into the host store and freed)."""
        if "expert_budget" in kwargs:
            kwargs["expert_budget"] = ExpertBudget.parse(kwargs["expert_budget"])
        config = EngineConfig(**{**(config.__dict__ if config else {}), **kwargs})
        adapter = get_adapter(model.config.model_type)
        refs = find_moe_layers(model, adapter)
        dtype = refs[0].experts.gate_up_proj.dtype
        device = next(p.device for p in model.parameters() if not p.is_meta)
        spec = build_spec(model, adapter, dtype)
        if not get_preset(config.policy).all_resident:
            BudgetPlan.make(config.expert_budget, spec)
        store = ExpertStore(spec, pin=device.type == "cuda")
        store.fill(ModuleExperts(refs, spec), progress=config.progress, desc="offloading experts")
        for ref in refs:
            for part in spec.parts:
                old = getattr(ref.experts, part.name)
                ref.experts._parameters[part.name] = nn.Parameter(
                    torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False
                )
        dense = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
        return cls(model, adapter, spec, store, config, device, tokenizer, dense, type(model).__name__)

    # -- use -----------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: ids pass through; chat messages (and text, when `chat` is on or
        the tokenizer has a chat template) go through the chat template."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        tok = self.tokenizer
        if tok is None:
            raise ConfigError("this model has no tokenizer; pass prompts as lists of token ids")
        if isinstance(prompt, str):
            use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
            if not use_chat:
                return tok(prompt, add_special_tokens=True)["input_ids"]
            prompt = [{"role": "user", "content": prompt}]
        if not getattr(tok, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template; pass plain text instead")
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_token_ids is not None:
            return set(params.stop_token_ids)
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    def pad_id(self) -> int:
        """The token id used for padding (the tokenizer's, the model's, or an EOS id)."""
        return self._pad_id()

    def _pad_id(self) -> int:
        for src in (self.tokenizer, getattr(self.model, "generation_config", None), self.model.config):
            pad = getattr(src, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        eos = sorted(self.stop_ids(SamplingParams()))
        return eos[0] if eos else 0

    def _start_iteration(self, step: int, is_prefill: bool, input_ids: torch.Tensor, live: torch.Tensor) -> None:
        self.begin_iteration(is_prefill, input_ids, live)

    def begin_iteration(
        self,
        is_prefill: bool,
        input_ids: torch.Tensor,
        live: torch.Tensor,
        request_ids: tuple[int, ...] | None = None,
        finished_ids: tuple[int, ...] = (),
    ) -> None:
        """Call before every forward pass: publishes the iteration to cache, prefetcher and predictors.

        `input_ids` [B, T] on the device, `live` [B, T] bool CPU (real tokens). A scheduler that
        batches continuously passes each row's stable `request_ids` [B] and the `finished_ids`
        that left the batch since its previous iteration (see `IterationContext`).
        """
        self.runtime.start_iteration(self._iterations, is_prefill, input_ids, live, request_ids, finished_ids)
        self._iterations += 1

    def end_requests(self) -> None:
        """Every request of the running batch is done: predictors commit request-level state."""
        self.runtime.end_requests()

    @property
    def context_length(self) -> int | None:
        """Most positions (prompt + generated tokens) the model takes, from its config."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embedding: token ids must lie in [0, vocab_size)."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    def check_token_ids(self, prompts: list[list[int]]) -> None:
        """Refuse token ids outside the vocabulary (on the GPU they would trip a device-side assert
        that kills the process) with the offending prompt, position and id."""
        vocab = self.vocab_size
        for i, ids in enumerate(prompts):
            bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
            if bad is not None:
                raise ConfigError(
                    f"prompt {i}: token id {ids[bad]} at position {bad} is outside the model's vocabulary "
                    f"(0..{vocab - 1}); token ids must come from this model's tokenizer"
                )

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None, chat: bool | None = None
    ) -> list[GenerationOutput]:
        """Generate for one prompt or a batch (text, token ids or chat messages)."""
        params = params or SamplingParams()
        if self.serving:
            raise ConfigError("this engine is being served by a scheduler; submit requests through it instead")
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], (int, dict))
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ConfigError("no prompts given")
        encoded = [self.encode(p, chat) for p in batch]
        if any(len(e) == 0 for e in encoded):
            raise ConfigError("empty prompt: every prompt needs at least one token")
        self.check_token_ids(encoded)
        self.cache.refresh_stall()
        before = self.cache.stats.copy()
        try:
            completions = generate_ids(
                self.model,
                encoded,
                params,
                self._pad_id(),
                self.stop_ids(params),
                self.device,
                self._start_iteration,
                static=self.static,
            )
        finally:
            self.end_requests()
        self.cache.refresh_stall()
        delta = self.cache.stats.minus(before)
        return [self._output(c, delta) for c in completions]

    @staticmethod
    def _device_unavailable(
        config: EngineConfig, fine: Any, device: torch.device, graphs: bool, name: str
    ) -> str | None:
        """Why `search="device"` cannot run for this engine (None: it can)."""
        if fine is None:
            return f"policy {name} has no map predictor"
        if device.type != "cuda" or not graphs:
            return "it needs CUDA graphs (a CUDA device, cuda_graphs not off, no sliding-window attention)"
        if config.map_values != "probs" or config.trajectory_window:
            return "it matches router probabilities over the whole prefix (map_values='probs', trajectory_window=0)"
        return None

    def _search_mode(self, config: EngineConfig, members: list, device: torch.device, graphs: bool) -> str:
        """`config.search` with "auto" resolved: "device" where it can run, else "sync"."""
        if config.search != "auto":
            return config.search
        fine = next((m for m in members if isinstance(m, FineMoEPredictor)), None)
        return "sync" if self._device_unavailable(config, fine, device, graphs, self.preset.name) else "device"

    def _device_search(self, config: EngineConfig, members: list, device: torch.device, graphed: bool) -> None:
        """`search="device"`: graphed decode steps (`graphed`, as `_setup` resolved it) match the maps
        on the GPU (`DeviceMatches`); where that cannot run, the search stays inline ("sync") and a
        warning says why."""
        fine = next((m for m in members if isinstance(m, FineMoEPredictor)), None)
        why = self._device_unavailable(config, fine, device, graphed, self.preset.name)
        if why is not None:
            log.warning("search='device' unavailable (%s): searching inline", why)
            return
        planner = DevicePlanner(
            self.maps.geometry,
            self.maps.capacity,
            self.spec.top_k,
            device,
            rule=config.delta_rule,
            min_score=config.map_min_score,
        )
        self.runtime.device_matches = fine.device = DeviceMatches(planner, self.maps, self.distance)
        fine.device.reads_every_layer = fine.hints  # (plans for launched layers too: no deferred match)
        # steps the graphs do not take (the warm-up, eager fallbacks) search on the host alike:
        # every map, one layer late, so a request's plans do not depend on which steps were graphed
        fine.lag, fine.candidates = 1, 0
        log.info(
            "search='device': the map store's copy takes %s of device memory; plans follow every map "
            "one layer late (trajectory_lag=1, trajectory_candidates=0, whatever was configured)",
            format_bytes(planner.nbytes()),
        )
        self.search_mode = "device"

    def close(self) -> None:
        """Save the map store (if one is configured), detach from the model (hooks, experts
        implementation) and free the pool and store. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.config.map_store and self._attachment is not None:
                self.save_map_store()
        finally:
            self._detach()
            self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype, except half precision on a CPU, which computes in float32 (CPUs run
    bf16/fp16 matmuls slowly or not at all); pass dtype= to override."""
    if device.type == "cpu" and stored in (torch.bfloat16, torch.float16):
        log.info("checkpoint is %s; computing in float32 on the CPU", stored)
        return torch.float32
    return stored


def _load_tokenizer(path: os.PathLike) -> Any:
    from pathlib import Path

    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        log.warning("could not load the tokenizer from %s (%s); prompts must be token ids", p, e)
        return None
    # transformers skips the spaces clean-up for a BPE tokenizer (it would strip spaces before
    # punctuation) and warns about it at the first decode: off here, the same text without the warning
    backend = getattr(tok, "backend_tokenizer", None)
    bpe = backend is not None and type(backend.model).__name__ == "BPE"
    forced = getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    if bpe and not forced and getattr(tok, "clean_up_tokenization_spaces", False):
        tok.clean_up_tokenization_spaces = False
    return tok
