"""The `finemoe` command line: one entry point, subcommands."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from finemoe.config import DUTY_MODES, PREFILL_PLANS, SEARCH_MODES
from finemoe.errors import FineMoEError
from finemoe.policy import EVICTION_POLICIES
from finemoe.simstudy import add_prefill_args, add_simulate_args, add_window_args


def _read_prompts(path: str, split: str | None = None) -> list[str]:
    """Prompts from a text file (one a line) or JSONL (field 'prompt'; `split` keeps the records
    whose 'split' field matches, e.g. the workload's history/test split)."""
    if path == "workload":
        from finemoe.workload import default_path

        path = str(default_path())
    p = Path(path)
    if not p.is_file():
        raise FineMoEError(f"prompts file {p} does not exist")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix == ".jsonl":
        prompts = []
        for n, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise FineMoEError(f"{p}:{n}: not valid JSON ({e})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise FineMoEError(f"{p}:{n}: each JSONL line needs a string field 'prompt'")
            if split is None or obj.get("split") == split:
                prompts.append(obj["prompt"])
        if split is not None and not prompts:
            raise FineMoEError(f"{p}: no record has split {split!r}")
        return prompts
    if split is not None:
        raise FineMoEError("--split needs a JSONL prompts file with a 'split' field")
    return lines


def _add_engine_args(ap: argparse.ArgumentParser) -> None:
    from finemoe.presets import DEFAULT_POLICY, PRESETS

    ap.add_argument("--model", help="local checkpoint directory (default: the reference model, built on first use)")
    ap.add_argument("--expert-budget", default="50%", help="slots ('96'), bytes ('8GiB') or share ('25%%')")
    ap.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(PRESETS), help="caching/prefetch policy")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the checkpoint's")
    ap.add_argument("--prefetch-distance", type=int, help="layers ahead a predictor plans (default: the policy's)")
    ap.add_argument("--map-store", help="history file: warm-start from it if it exists, save to it at exit")
    ap.add_argument("--map-store-capacity", type=int, default=1000, help="expert maps (and past requests) kept")
    ap.add_argument("--freeze-map-store", action="store_true", help="do not learn from this run (offline mode)")
    ap.add_argument(
        "--record-requests",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep each finished request's expert activation matrix (moe-infinity's history) while learning; "
        "default: when the policy reads them or a --map-store file will hold them",
    )
    ap.add_argument(
        "--delta-rule", choices=["paper", "demo", "topk"], default="paper", help="FineMoE selection count rule"
    )
    ap.add_argument(
        "--search",
        choices=list(SEARCH_MODES),
        default="auto",
        help="where map search runs: inline (sync), a searcher thread (async), a worker process (process), or "
        "on the GPU inside graphed decode steps (device: CUDA only); auto: device where it can run, else sync",
    )
    ap.add_argument(
        "--prediction-duty",
        choices=list(DUTY_MODES),
        default="auto",
        help="adaptive: predict only while it shortens the measured decode step (auto: adaptive on CUDA, inline)",
    )
    ap.add_argument("--map-store-rows", choices=["all", "last"], default="all", help="prefill tokens stored as maps")
    ap.add_argument("--trajectory-window", type=int, default=0, help="layers a trajectory match compares (0 = all)")
    ap.add_argument(
        "--trajectory-candidates",
        type=int,
        default=64,
        help="decode: after layer 4 follow only the K best-matching maps (0 = every map at every layer)",
    )
    ap.add_argument(
        "--map-min-score",
        type=float,
        default=0.0,
        help="finemoe: prefetch from a matched expert map only if its match score reaches this (0 = always)",
    )
    ap.add_argument(
        "--map-min-precision",
        type=float,
        default=0.0,
        help="finemoe: withhold map plans while their measured precision is below this (0 = never)",
    )
    ap.add_argument("--no-gate-refine", action="store_true", help="finemoe: expert maps only (no next-layer gate)")
    ap.add_argument(
        "--prefill-plans",
        choices=list(PREFILL_PLANS),
        default="auto",
        help="finemoe's prefetch plans in prefill: maps (+ gate), gate only, none (auto: the policy's)",
    )
    ap.add_argument("--eviction", choices=sorted(EVICTION_POLICIES), help="override the policy's eviction policy")
    add_prefill_args(ap)
    ap.add_argument(
        "--cuda-graphs",
        choices=["auto", "on", "off"],
        default="auto",
        help="single prompts: static KV cache, decode steps replayed from CUDA graphs (auto: on with CUDA)",
    )
    add_window_args(ap)
    ap.add_argument(
        "--warm-pool",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fill the expert budget's free slots at start-up, layer by layer, instead of on first use "
        "(a longer start, fewer first misses; worth it near 100%%); default: on where decode steps are "
        "graphed (CUDA)",
    )
    ap.add_argument(
        "--graph-gates",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="graphed decode: the speculative gates computed on the GPU beside the segments, not on the "
        "host; default: on where the map search runs on the GPU (--search device or auto)",
    )
    ap.add_argument(
        "--gather-absent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="near 100%%: keep the absent experts in the last layers, every other layer whole, so graphed "
        "decode syncs on the last layers' routings only (a few copies after each prompt); default: on where "
        "decode steps are graphed (CUDA)",
    )
    ap.add_argument("--no-progress", action="store_true", help="hide the loading progress bar")
    ap.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="keep Python's cyclic garbage collector scanning the loaded model and stores (by default "
        "they are frozen once loaded: a full collection over them pauses a request for ~0.2 s)",
    )


def _engine(args: argparse.Namespace):
    from finemoe.engine import Engine

    model = args.model or _default_model()
    return Engine.from_pretrained(
        model,
        expert_budget=args.expert_budget,
        policy=args.policy,
        device=args.device,
        dtype=args.dtype,
        prefetch_distance=args.prefetch_distance,
        map_store=args.map_store,
        map_store_capacity=args.map_store_capacity,
        map_store_learn=not args.freeze_map_store,
        delta_rule=args.delta_rule,
        search=args.search,
        prediction_duty=args.prediction_duty,
        map_store_rows=args.map_store_rows,
        trajectory_window=args.trajectory_window,
        trajectory_candidates=args.trajectory_candidates,
        map_min_score=args.map_min_score,
        map_min_precision=args.map_min_precision,
        gate_refine=not args.no_gate_refine,
        cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
        prefill_plans=args.prefill_plans,
        eviction=args.eviction,
        prefill_eviction=args.prefill_eviction,
        prefill_predict=args.prefill_predict,
        max_inflight_prefetches=args.max_inflight_prefetches,
        prefetch_window=args.prefetch_window,
        warm_pool=args.warm_pool,
        graph_gates=args.graph_gates,
        gather_absent=args.gather_absent,
        record_requests=getattr(args, "record_requests", None),
        progress=not args.no_progress,
    )


def _default_model():
    from finemoe import reference

    path = reference.ensure_built()
    print(
        f"[finemoe] default model: the reference MoE (SmolLM2-135M-Instruct as Qwen2-MoE, "
        f"{reference.DEFAULT_GEOMETRY}) at {path}; pass --model PATH for another checkpoint",
        file=sys.stderr,
    )
    return path


@contextlib.contextmanager
def _frozen_gc(args: argparse.Namespace) -> Iterator[None]:
    """Exempt everything alive now (the loaded engine: model, pool, stores) from the cyclic garbage
    collector while the command runs: a full collection over those objects takes ~0.2 s
    (`benchmarks/gc_pause.py`) and lands in whichever request allocates at the wrong moment. Garbage
    is collected first; the freeze is lifted on exit. `--no-gc-freeze` turns it off."""
    if getattr(args, "no_gc_freeze", False):
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def cmd_generate(args: argparse.Namespace) -> int:
    from finemoe.config import SamplingParams

    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts, args.split)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if not prompts:
        raise FineMoEError("no prompts given")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    chat = False if args.raw else None
    with _engine(args) as engine, _frozen_gc(args):
        for i in range(0, len(prompts), args.batch_size):
            for out in engine.generate(prompts[i : i + args.batch_size], params, chat=chat):
                if args.json:
                    print(json.dumps(out.to_dict()), flush=True)
                else:
                    c = out.cache
                    print(out.text, flush=True)
                    print(
                        f"[finemoe] policy={out.policy} ttft={out.ttft_s * 1e3:.1f}ms "
                        f"tpot={out.tpot_s * 1e3:.1f}ms tokens={len(out.token_ids)} hit_rate={c.hit_rate:.3f} "
                        f"misses={c.misses} copied={c.bytes_copied / 2**20:.1f}MiB stall={c.stall_s * 1e3:.1f}ms",
                        file=sys.stderr,
                    )
        st = engine.stats()
        if args.json:
            print(json.dumps({"summary": st.to_dict()}), flush=True)
        else:
            print(
                f"[finemoe] engine: {st.slots}/{st.total_experts} experts on {st.device} "
                f"({st.pool_bytes / 2**20:.1f} MiB pool), overall hit rate {st.cache.hit_rate:.3f}",
                file=sys.stderr,
            )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from finemoe.config import format_bytes
    from finemoe.engine import Engine

    info = Engine.inspect(args.model or _default_model(), args.expert_budget, args.dtype)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['path']}: {info['family']} ({info['model_type']}), {info['dtype']}")
    print(
        f"  {info['moe_layers']} MoE layers of {info['decoder_layers']}, {info['experts_per_layer']} experts each, "
        f"top-{info['top_k']}; one expert {format_bytes(info['expert_bytes'])}, all experts "
        f"{format_bytes(info['total_expert_bytes'])}"
    )
    print(f"  always resident (dense, attention, shared experts, embeddings): {format_bytes(info['dense_bytes'])}")
    what = "every expert resident" if info["all_resident"] else f"{info['slots']} expert slots"
    print(
        f"  budget {info['budget']}: {what} ({format_bytes(info['pool_bytes'])}); device memory for weights "
        f"{format_bytes(info['device_bytes'])} plus the KV cache and activations"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from finemoe.models import ADAPTERS

    print(f"{'family':<26} {'model_type':<12} {'routing':<62} shared experts")
    for a in ADAPTERS.values():
        print(f"{a.display_name:<26} {a.model_type:<12} {a.routing:<62} {a.shared_experts}")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from finemoe.presets import PRESETS

    for p in PRESETS.values():
        print(f"{p.name:<16} {p.description}")
    return 0


def bench_script() -> Path:
    """`benchmarks/bench_offload.py` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "bench_offload.py"


def cmd_bench(argv: list[str]) -> int:
    """`finemoe bench ARGS`: the GPU benchmark of real MoE shapes against every baseline and
    Accelerate (`benchmarks/bench_offload.py ARGS`, run in this process; `finemoe bench --help`)."""
    import runpy

    script = bench_script()
    if not script.is_file():
        raise FineMoEError(
            f"finemoe bench runs {script}, which is not there: benchmarks/ ships with the source checkout, not "
            "the installed package; clone the repository and install it editable (make setup)"
        )
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from pathlib import Path as _P

    from finemoe import reference
    from finemoe.reference.fit import FitSettings, Geometry

    try:
        geo = Geometry.parse(args.geometry)
    except ValueError as e:
        raise FineMoEError(str(e)) from e
    if args.action == "build":
        out = reference.build(geo, _P(args.out) if args.out else None)
        print(out)
    elif args.action == "fit":
        st = FitSettings(tokens=args.tokens, steps=args.steps, seed=args.seed)
        init = _P(args.init) if args.init else None
        print(
            reference.fit(
                geo, st, args.distill_steps, _P(args.out) if args.out else None, init=init, answers=args.answers
            )
        )
    return 0


def _progress(label: str):
    """A one-line progress reporter on stderr: `report(done, total)`."""
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        if done == total or done % max(total // 50, 1) == 0:
            el = time.perf_counter() - t0
            eta = el / done * (total - done) if done else 0.0
            end = "\n" if done == total else ""
            print(
                f"\r[finemoe] {label}: {done}/{total} ({el:.0f}s, ~{eta:.0f}s left)",
                end=end,
                file=sys.stderr,
                flush=True,
            )

    return report


def cmd_trace(args: argparse.Namespace) -> int:
    import torch

    from finemoe import trace as tracing

    if args.action == "info":
        if not args.trace:
            raise FineMoEError("trace info needs a trace file")
        tr = tracing.load_trace(args.trace)
        s = tr.spec
        info = {
            "path": args.trace,
            "model_type": s.model_type,
            "layers": s.num_layers,
            "experts": s.num_experts,
            "top_k": s.top_k,
            "requests": tr.num_requests,
            "rows": tr.num_rows,
            "prompt_tokens": int(tr.prompt_len.sum()),
            "generated_tokens": int(tr.output_len.sum()),
            "layer_steps": tr.layer_steps(),
            "probs_dtype": str(tr.probs.dtype).removeprefix("torch."),
            "speculative_strides": sorted(tr.spec_probs),
            "finemoe_version": tr.finemoe_version,
        }
        print(json.dumps(info, indent=1))
        return 0
    if not args.out:
        raise FineMoEError("trace record needs --out TRACE")
    prompts = _read_prompts(args.prompts, args.split)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if not prompts:
        raise FineMoEError("no prompts given")
    args.expert_budget, args.policy = "100%", "all-gpu"
    dtype = torch.float32 if args.precision == "float32" else torch.float16
    with _engine(args) as engine:
        tr = tracing.record(engine, prompts, args.max_new_tokens, dtype=dtype, progress=_progress("recording"))
    tr.save(args.out)
    print(f"[finemoe] wrote {args.out}: {tr.num_requests} requests, {tr.layer_steps()} layer-steps", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from finemoe.server import ServerConfig, serve
    except ImportError as e:
        raise FineMoEError(f"the server needs its extra: pip install 'finemoe[server]' ({e})") from e
    api_key = args.api_key or os.environ.get("FINEMOE_API_KEY") or None
    engine = _engine(args)
    name = args.served_model_name or Path(engine.name).name or "finemoe"
    config = ServerConfig(
        model_name=name,
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        max_body_bytes=args.max_body_bytes,
        default_max_tokens=args.default_max_tokens,
        drain_s=args.drain_s,
    )
    auth = "API key required" if api_key else "no API key"
    print(f"[finemoe] serving {name!r} on http://{args.host}:{args.port}/v1 ({auth})", file=sys.stderr)
    try:
        with _frozen_gc(args):
            serve(engine, config, close_engine=True)
    finally:
        engine.close()  # no-op when the server already closed it
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import os

    from finemoe.chat import LocalChat, RemoteChat, run_chat
    from finemoe.config import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.url:
        api_key = args.api_key or os.environ.get("FINEMOE_API_KEY") or None
        backend = RemoteChat(args.url, api_key, args.served_model_name)
    else:
        backend = LocalChat(_engine(args))
    try:
        with _frozen_gc(args) if isinstance(backend, LocalChat) else contextlib.nullcontext():
            return run_chat(backend, params, system=args.system)
    finally:
        backend.close()
        if isinstance(backend, LocalChat):
            backend.engine.close()


def cmd_simulate(args: argparse.Namespace) -> int:
    from finemoe.simstudy import run_sweep

    return run_sweep(args)


def _version() -> str:
    """'finemoe X (hot modules: compiled 19/19)': whether setup.py's optional build is in use."""
    from finemoe import __version__, _native

    return f"finemoe {__version__} (hot modules: {_native.summary()})"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finemoe", description="Lossless expert offloading for MoE LLMs.")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    ap.add_argument(
        "--version", action="version", version=_version(), help="the version, and whether the hot modules run compiled"
    )
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt or a file of prompts")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument(
        "--prompts",
        help="a text file (one prompt a line), JSONL with a 'prompt' field, or 'workload' (the shipped one)",
    )
    _add_engine_args(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate --max-new-tokens tokens per prompt even past the end-of-sequence token (fixed-length runs)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--batch-size", type=int, default=1, help="prompts run together (default one at a time)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt, then {'summary': engine stats}")
    g.add_argument("--split", help="JSONL prompts: keep records of this split (e.g. history, test)")
    g.add_argument("--limit", type=int, help="use only the first N prompts")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="what a budget means for a checkpoint, without loading weights")
    i.add_argument("--model", help="local checkpoint directory (default: the reference model, built on first use)")
    i.add_argument("--expert-budget", default="50%")
    i.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("reference", help="build (or fit) the reference MoE made from SmolLM2-135M-Instruct")
    r.add_argument("action", choices=["build", "fit"])
    r.add_argument("--geometry", default="16x4+1024", help="EXPERTSxTOPK[+SHARED_NEURONS], e.g. 8x2, 64x8+512")
    r.add_argument("--out", help="build: checkpoint directory; fit: the fit file (default: the shipped one)")
    r.add_argument("--tokens", type=int, default=16000, help="fit: calibration tokens")
    r.add_argument("--steps", type=int, default=250, help="fit: optimiser steps per layer")
    r.add_argument("--distill-steps", type=int, default=200, help="fit: router distillation steps (0 = none)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--init", help="fit: continue distilling from this fit file (skips the layer-wise fit)")
    r.add_argument("--answers", type=int, default=300, help="fit: prompts extended with the teacher's answer")
    r.set_defaults(func=cmd_reference)

    t = sub.add_parser("trace", help="record a routing trace (or describe one) for the simulator")
    t.add_argument("action", choices=["record", "info"])
    t.add_argument("trace", nargs="?", help="info: the trace file")
    t.add_argument("--prompts", default="workload", help="text file, JSONL or 'workload' (default)")
    t.add_argument("--split", help="JSONL prompts: keep records of this split (history, test)")
    t.add_argument("--limit", type=int, help="use only the first N prompts")
    t.add_argument("--out", help="record: the trace file to write")
    t.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (EOS ignored)")
    t.add_argument("--precision", choices=["float16", "float32"], default="float16", help="router probabilities")
    for flag, kw in (
        ("--model", {"help": "local checkpoint directory (default: the reference model)"}),
        ("--device", {"default": "auto"}),
        ("--dtype", {"choices": ["float32", "float16", "bfloat16"]}),
    ):
        t.add_argument(flag, **kw)
    # every engine setting at its default (kept in step with _add_engine_args), then the recorder's own
    engine_defaults = argparse.ArgumentParser(add_help=False)
    _add_engine_args(engine_defaults)
    t.set_defaults(
        **{k: v for k, v in vars(engine_defaults.parse_args([])).items() if k not in ("model", "device", "dtype")}
    )
    t.set_defaults(func=cmd_trace, no_progress=True, freeze_map_store=True, search="sync")

    sm = sub.add_parser("simulate", help="replay traces through the policies against a cost model")
    add_simulate_args(sm)
    sm.set_defaults(func=cmd_simulate)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (streaming, concurrent requests)")
    _add_engine_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $FINEMOE_API_KEY, else none)")
    sv.add_argument("--served-model-name", help="the model id clients use (default: the checkpoint's directory name)")
    sv.add_argument("--max-batch", type=int, default=16, help="requests decoding together")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting to join; beyond it: HTTP 429")
    sv.add_argument("--max-prefill-tokens", type=int, default=4096, help="padded prompt tokens per prefill pass")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (else HTTP 413)")
    sv.add_argument("--default-max-tokens", type=int, default=1024, help="chat requests without max_tokens")
    sv.add_argument("--drain-s", type=float, default=10.0, help="shutdown: seconds in-flight requests may finish")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="interactive chat in the terminal (in-process, or against a server with --url)")
    _add_engine_args(ch)
    ch.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (default: run the engine here)")
    ch.add_argument("--api-key", help="the server's key (default: $FINEMOE_API_KEY)")
    ch.add_argument("--served-model-name", help="--url: the model id to ask for (default: the server's)")
    ch.add_argument("--system", help="a system prompt")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.95)
    ch.add_argument("--seed", type=int)
    ch.set_defaults(func=cmd_chat)

    m = sub.add_parser("models", help="list the supported model families")
    m.set_defaults(func=cmd_models)
    p = sub.add_parser("policies", help="list the caching/prefetch policies")
    p.set_defaults(func=cmd_policies)
    # listed for --help; `main` hands everything after "bench" to the benchmark's own parser
    sub.add_parser("bench", help="benchmark real MoE shapes on a GPU: every policy, Accelerate (bench --help)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        try:
            return cmd_bench(argv[1:])
        except FineMoEError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    for flag in ("max_batch", "max_prefill_tokens", "max_body_bytes", "default_max_tokens", "max_tokens"):
        if getattr(args, flag, 1) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if getattr(args, "max_queue", 0) < 0:
        print("error: --max-queue must be >= 0", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except FineMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
