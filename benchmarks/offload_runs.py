"""Measured runs of `bench_offload.py`: plain transformers, the engine, Accelerate, online serving.

Each run returns plain dicts of seconds and counters; `summarize` merges the rounds of one
configuration. A work item is `(prompt ids, new tokens, before)`, where `before()` runs before
every generate call (trace routing restarts its request there).
"""

from __future__ import annotations

import gc
import logging
import random
import statistics
import time

import torch

from finemoe import SamplingParams
from finemoe.generation import generate_ids
from finemoe.types import ExpertId

log = logging.getLogger("bench")

CACHE_KEYS = (
    "hits",
    "misses",
    "bytes_copied",
    "stall_s",
    "demand_bytes",
    "prefetches_issued",
    "prefetches_used",
    "prefetches_late",
    "prefetches_wasted",
)


class GCClock:
    """Time the interpreter spends in cyclic garbage collection (a `gc.callbacks` entry): a
    collection during a decode step is host time on its critical path, in no other column."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._t0 = 0.0, [0, 0, 0], 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.collections[info["generation"]] += 1

    def read(self):
        return self.seconds, list(self.collections)


GC_CLOCK = GCClock()
GC_FREEZE = False  # bench_offload --gc-freeze: gc.freeze() before each measured request


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps(times):
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def hf_generate(model, ids, n, processors=None):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, logits_processor=processors)


class StepStamps:
    """A logits processor that only stamps the host clock when generate hands it a step's logits:
    per-step times of transformers' own loop (which synchronises every step in its stopping check),
    comparable with the engine's per-token times. The first stamp waits for the device (TTFT)."""

    def __init__(self, device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if not self.times:
            sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_run(model, prompt, n, device, before=lambda: None):
    """transformers generate, one n-token call: TTFT to the first step's logits, per-step times
    between consecutive steps (median over steps, as for the engine)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt], device=device)
    stamps = StepStamps(device)
    sync(device)
    before()
    t0 = time.perf_counter()
    hf_generate(model, ids, n, LogitsProcessorList([stamps]))
    sync(device)
    tn = time.perf_counter()
    ts = stamps.times
    return {"ttft_s": ts[0] - t0, "e2e_s": tn - t0, "steps_s": steps(ts)}


def loop_run(model, prompt, n, device, before=lambda: None):
    before()
    t0 = time.perf_counter()
    c = generate_ids(model, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True), 0, set(), device)[0]
    return {"ttft_s": c.ttft_s, "e2e_s": time.perf_counter() - t0, "steps_s": steps(c.token_times_s)}


def trace_work(replays, requests):
    """Work items replaying the first `requests` requests of the trace behind `replays` (one
    `TraceRouting` per model routed alike): each item's `before` restarts every replay."""
    trace = replays[0].trace
    work = []
    for r in range(min(requests, trace.num_requests)):

        def before(r=r):
            for rp in replays:
                rp.start(r)

        work.append((replays[0].prompt_ids(r), replays[0].output_len(r), before))
    return work


def engine_request(eng, item):
    """One request through the engine; returns (output, wall seconds)."""
    prompt, n, before = item
    before()
    t0 = time.perf_counter()
    out = eng.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
    return out, time.perf_counter() - t0


def engine_run(eng, item, warm):
    """`item` through the engine right after `warm` (another request, 8 tokens): the cache holds
    what serving the previous request left, never the measured request's own experts."""
    engine_request(eng, (warm[0], min(8, warm[1]), warm[2]))
    if eng.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rt = eng.runtime
    crit0, iters0, sync0 = rt.critical_decode_s, rt.decode_iterations, rt.sync_decode_s
    serve0 = (rt.serve_decode_s, rt.launch_decode_s, rt.post_launch_decode_s)
    critp0, syncp0 = rt.critical_prefill_s, rt.sync_s - rt.sync_decode_s
    if GC_FREEZE:
        gc.collect()  # the previous request's garbage is not frozen with the rest
        gc.freeze()  # what exists now (model, engine, stores) is never scanned again
    gc0, n0 = GC_CLOCK.read()
    try:
        out, e2e = engine_request(eng, item)
    finally:
        if GC_FREEZE:
            gc.unfreeze()
    gc1, n1 = GC_CLOCK.read()
    c = out.cache
    peak = torch.cuda.max_memory_allocated() if eng.device.type == "cuda" else 0
    return {
        "ttft_s": out.ttft_s,
        "e2e_s": e2e,
        "steps_s": steps(out.token_times_s),
        "peak_gpu_bytes": peak,
        "predictor_decode_s": rt.critical_decode_s - crit0,
        "decode_iterations": rt.decode_iterations - iters0,
        "sync_decode_s": rt.sync_decode_s - sync0,
        # graphed decode: a layer's serve before its launch, the launch call, and after it
        "serve_decode_s": rt.serve_decode_s - serve0[0],
        "launch_decode_s": rt.launch_decode_s - serve0[1],
        "post_launch_decode_s": rt.post_launch_decode_s - serve0[2],
        "predictor_prefill_s": rt.critical_prefill_s - critp0,  # forward-thread predictor time in the prefill
        "sync_prefill_s": rt.sync_s - rt.sync_decode_s - syncp0,  # the prefill's routing syncs
        "gc_s": gc1 - gc0,  # in cyclic garbage collection during the request
        "gc_collections": [b - a for a, b in zip(n0, n1, strict=True)],  # per generation 0/1/2
        "window": eng.prefetcher.window.stats(),  # the link-aware prefetch window after the request
        "duty": eng.runtime.duty.stats() if eng.runtime.duty is not None else None,  # adaptive prediction
    } | {k: getattr(c, k) for k in CACHE_KEYS}


def engine_profile(eng, item, warm, top=45):
    """`engine_run` under cProfile: the host functions that fill a decode step (text table)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    engine_request(eng, (warm[0], min(8, warm[1]), warm[2]))
    prof.enable()
    out, e2e = engine_request(eng, item)
    prof.disable()
    buf = io.StringIO()
    buf.write(f"e2e {e2e:.3f}s (profiled), {len(out.token_ids)} tokens\n")
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("cumulative").print_stats("finemoe/", top)
    return buf.getvalue()


def summarize(samples):
    """Merge the rounds of one configuration: medians of TTFT, end-to-end and of all per-token steps."""
    out = {"ttft_s": statistics.median(s["ttft_s"] for s in samples)}
    out["e2e_s"] = statistics.median(s["e2e_s"] for s in samples)
    all_steps = [x for s in samples for x in s["steps_s"]]
    out["tpot_s"] = statistics.median(all_steps)
    out["tpot_mean_s"] = statistics.fmean(all_steps)
    out["tpot_round_means_s"] = [statistics.fmean(s["steps_s"]) for s in samples]
    out["samples"] = len(samples)
    if "hits" in samples[0]:
        for key in CACHE_KEYS:
            out[key] = sum(s[key] for s in samples)
        acc = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / acc if acc else 0.0
        out["demand_bandwidth_gbps"] = out["demand_bytes"] / out["stall_s"] / 1e9 if out["stall_s"] else 0.0
        issued = out["prefetches_issued"]
        out["prefetch_precision"] = out["prefetches_used"] / issued if issued else 0.0
        out["peak_gpu_bytes"] = max(s["peak_gpu_bytes"] for s in samples)
        out["stall_per_token_s"] = out["stall_s"] / max(1, len(all_steps) + len(samples))
        iters = sum(s.get("decode_iterations", 0) for s in samples)
        if iters:
            out["predictor_ms_per_decode_step"] = sum(s["predictor_decode_s"] for s in samples) / iters * 1e3
            out["sync_ms_per_decode_step"] = sum(s["sync_decode_s"] for s in samples) / iters * 1e3
            for key in ("serve", "launch", "post_launch"):
                if f"{key}_decode_s" in samples[0]:
                    out[f"{key}_ms_per_decode_step"] = sum(s[f"{key}_decode_s"] for s in samples) / iters * 1e3
        if "predictor_prefill_s" in samples[0]:  # per request (one prefill each)
            out["predictor_ms_per_prefill"] = statistics.fmean(s["predictor_prefill_s"] for s in samples) * 1e3
            out["sync_ms_per_prefill"] = statistics.fmean(s["sync_prefill_s"] for s in samples) * 1e3
        if "gc_s" in samples[0]:  # per generated token (prefill's collections included)
            out["gc_ms_per_token"] = sum(s["gc_s"] for s in samples) / max(1, len(all_steps) + len(samples)) * 1e3
            out["gc_collections"] = [sum(c) for c in zip(*(s["gc_collections"] for s in samples), strict=True)]
    if "window" in samples[0]:
        out["window"] = samples[-1]["window"]
    if samples[0].get("duty") is not None:
        out["duty"] = [s["duty"] for s in samples]  # after each request (a reconfigure back resumes the duty)
    return out


def copy_bandwidth(eng, count):
    """On-demand copies of `count` distinct experts into rotating slots, timed by CUDA events."""
    cache, spec = eng.cache, eng.spec
    tr = cache.transfer
    torch.cuda.synchronize()
    before = tr.demand_seconds()
    for i in range(count):
        eid = ExpertId(i % spec.num_layers, (i // spec.num_layers) % spec.num_experts)
        tr.load(i % cache.num_slots, eng.store.parts(eid), demand=True)
    tr.synchronize()  # issues the queued copies and waits for them
    torch.cuda.synchronize()
    secs = tr.demand_seconds() - before
    return {
        "experts": count,
        "expert_bytes": spec.expert_bytes,
        "seconds": secs,
        "gbps": count * spec.expert_bytes / secs / 1e9,
    }


def accelerate_runs(plain, caps, work, device, tokens):
    """Hugging Face Accelerate offloading of the plain model, what transformers users do today:
    `device_map` from `infer_auto_device_map` with the GPU capped at `caps[budget]` bytes (dense
    bytes + the budget's share of expert bytes; whole decoder layers stay or stream, per
    `_no_split_modules`), weights of the streamed layers in host memory. `tokens` new tokens per
    request (it is slow). {budget: [samples]}; the plain model ends on the host."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    out: dict[str, list] = {}
    plain.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    for budget, cap in caps.items():
        dmap = infer_auto_device_map(
            plain,
            max_memory={device.index or 0: cap, "cpu": 10**13},
            no_split_module_classes=list(getattr(plain, "_no_split_modules", None) or []),
            dtype=next(plain.parameters()).dtype,
        )
        dispatch_model(plain, device_map=dmap)
        on_gpu = sum(1 for v in dmap.values() if v not in ("cpu", "disk"))
        log.info("accelerate %s: GPU cap %.2f GiB, %d of %d map entries on it", budget, cap / 2**30, on_gpu, len(dmap))
        torch.cuda.reset_peak_memory_stats()
        out[budget] = []
        for p, n, before in work:
            r = hf_run(plain, p, min(n, tokens), device, before)
            r["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            out[budget].append(r)
        remove_hook_from_module(plain, recurse=True)
        plain.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
    return out


def poisson_arrivals(n, rate, seed):
    """`n` arrival times (s, from 0) of a Poisson process of `rate` requests per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def serving_run(eng, work, arrivals):
    """Online serving at batch 1, first come first served, in real time: request i arrives at
    `arrivals[i]` (s after the start) and waits while earlier ones run; the engine idles (its
    copies may finish) until the next arrival. Per request: latency (arrival to last token), TTFT
    (arrival to first token, queueing included), queueing delay and service time."""
    engine_request(eng, (work[-1][0], min(8, work[-1][1]), work[-1][2]))  # warm-up, as in the rounds
    start = time.perf_counter()
    rows = []
    for i, t_arr in enumerate(arrivals):
        item = work[i % len(work)]
        now = time.perf_counter() - start
        if now < t_arr:
            time.sleep(t_arr - now)
        begin = time.perf_counter() - start
        out, service = engine_request(eng, item)
        end = time.perf_counter() - start
        rows.append(
            {
                "arrival_s": t_arr,
                "queue_s": begin - t_arr,
                "service_s": service,
                "latency_s": end - t_arr,
                "ttft_s": begin - t_arr + out.ttft_s,
                "tokens": len(out.token_ids),
                "hit_rate": out.cache.hit_rate,
            }
        )
    lat = sorted(r["latency_s"] for r in rows)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    return {
        "requests": rows,
        "latency_p50_s": pct(0.5),
        "latency_p90_s": pct(0.9),
        "latency_max_s": lat[-1],
        "latency_mean_s": statistics.fmean(lat),
        "ttft_mean_s": statistics.fmean(r["ttft_s"] for r in rows),
        "service_mean_s": statistics.fmean(r["service_s"] for r in rows),
        "utilisation": sum(r["service_s"] for r in rows) / (time.perf_counter() - start),
    }
