"""Load test of `finemoe serve`: throughput and latency percentiles at 1, 4 and 16 concurrent clients.

The server runs as a subprocess on loopback (the reference model by default, one budget and
policy); this process runs the clients (threads, streaming chat completions, fixed output length
with ignore_eos so every level does the same work per request). Each level sends a bounded number
of requests (and stops issuing new ones after --max-seconds). Per request the client measures TTFT
(submission to the first content chunk), TPOT ((latency - TTFT) / (tokens - 1)) and latency.
Throughput is output tokens over the level's wall time. Writes a JSON record and a PNG.

    python benchmarks/load_server.py --out docs/results/server_load.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta  # noqa: E402
from finemoe.workload import load_workload  # noqa: E402

log = logging.getLogger("load_server")


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finemoe", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--expert-budget", args.budget, "--policy", args.policy, "--max-batch", str(args.max_batch)]
    cmd += ["--device", "cpu", "--no-progress", "--served-model-name", "bench"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in the server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy in time")


def stop_server(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stats: dict = {}
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices", []):
                if first is None and (ch.get("delta") or {}).get("content"):
                    first = time.perf_counter()
                if ch.get("finish_reason"):
                    stats = chunk.get("finemoe", {})
    end = time.perf_counter()
    first = first or end
    return {
        "ttft_s": first - t0,
        "latency_s": end - t0,
        "tokens": tokens,
        "tpot_s": (end - first) / (tokens - 1) if tokens > 1 else 0.0,
        "server_mean_batch": stats.get("mean_batch_size"),
        "hit_rate": stats.get("hit_rate"),
        "start": t0,
        "end": end,
    }


def run_level(base: str, prompts: list[str], clients: int, requests: int, max_tokens: int, max_s: float) -> dict:
    url = base + "/v1/chat/completions"
    lock = threading.Lock()
    issued = [0]
    done: list[dict] = []
    stop_at = time.monotonic() + max_s

    def worker() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if issued[0] >= requests or time.monotonic() > stop_at:
                        return
                    i = issued[0]
                    issued[0] += 1
                res = one_request(client, url, prompts[i % len(prompts)], max_tokens)
                with lock:
                    done.append(res)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in done)
    out = {
        "clients": clients,
        "requests": len(done),
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "mean_server_batch": statistics.mean(r["server_mean_batch"] or 0 for r in done),
        "hit_rate_mean": statistics.mean(r["hit_rate"] or 0 for r in done),
    }
    for key in ("ttft_s", "tpot_s", "latency_s"):
        vals = sorted(r[key] for r in done)
        for q in (50, 90, 99):
            out[f"{key[:-2]}_p{q}_s"] = percentile(vals, q)
    return out


def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = record["levels"]
    c = [lv["clients"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(c, [lv["output_tokens_per_s"] for lv in levels], "o-")
    a.set_xscale("log", base=2)
    a.set_xticks(c, [str(x) for x in c])
    a.set_xlabel("concurrent clients")
    a.set_ylabel("output tokens / s")
    a.set_title("throughput")
    for key, style in (("ttft", "o-"), ("tpot", "s-"), ("latency", "^-")):
        b.plot(c, [lv[f"{key}_p50_s"] for lv in levels], style, label=f"{key} p50")
        b.plot(c, [lv[f"{key}_p90_s"] for lv in levels], style, alpha=0.4, label=f"{key} p90")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xticks(c, [str(x) for x in c])
    b.set_xlabel("concurrent clients")
    b.set_ylabel("seconds")
    b.set_title("latency")
    b.legend(fontsize=7)
    cfg = record["config"]
    fig.suptitle(f"finemoe serve, {cfg['model_label']}, budget {cfg['budget']}, {cfg['policy']}, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pct(level: dict, key: str) -> str:
    return "/".join(f"{level[f'{key}_p{q}_s']:.2f}" for q in (50, 90, 99))


def table(record: dict) -> str:
    """The levels as a markdown table."""
    rows = [
        "| clients | requests | req/s | output tok/s | TTFT p50/p90/p99 s | TPOT p50/p90/p99 s "
        "| latency p50/p90/p99 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in record["levels"]:
        rows.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['requests_per_s']:.3f} | {lv['output_tokens_per_s']:.1f} "
            f"| {_pct(lv, 'ttft')} | {_pct(lv, 'tpot')} | {_pct(lv, 'latency')} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the reference model)")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--policy", default="finemoe")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels")
    ap.add_argument("--requests", default="6,16,32", help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (EOS ignored)")
    ap.add_argument("--threads", type=int, help="torch threads of the server (default: torch's)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=240, help="per level: no new requests after this")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--startup-s", type=float, default=600)
    ap.add_argument("--out", default="docs/results/server_load.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    clients = [int(x) for x in args.clients.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    if len(counts) != len(clients):
        ap.error("--requests needs one count per --clients level")
    prompts = [p.prompt for p in load_workload(split="test")]
    proc = start_server(args, args.port)
    base = f"http://127.0.0.1:{args.port}"
    try:
        log.info("warm-up")
        run_level(base, prompts[-8:], 2, 2, 8, 60)
        levels = []
        for c, n in zip(clients, counts, strict=True):
            lv = run_level(base, prompts, c, n, args.max_tokens, args.max_seconds)
            log.info(
                "%2d clients: %d requests, %.2f req/s, %.1f tok/s, TTFT p50 %.2fs, TPOT p50 %.3fs, batch %.1f",
                c, lv["requests"], lv["requests_per_s"], lv["output_tokens_per_s"], lv["ttft_p50_s"],
                lv["tpot_p50_s"], lv["mean_server_batch"],
            )  # fmt: skip
            levels.append(lv)
        server_metrics = httpx.get(base + "/metrics").text
    finally:
        stop_log = stop_server(proc)
    record = {
        "meta": run_meta(),
        "config": {
            "model_label": Path(args.model).name if args.model else "reference MoE (SmolLM2-135M, Qwen2-MoE 16x4+1024)",
            "budget": args.budget,
            "policy": args.policy,
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "server_threads": args.threads or "torch default",
            "prompts": "workload test split, in order, chat template",
            "dtype": "float32 (CPU)",
        },
        "levels": levels,
        "speedup_max_vs_1_client": levels[-1]["output_tokens_per_s"] / levels[0]["output_tokens_per_s"],
        "server_batch_histogram": [ln for ln in server_metrics.splitlines() if ln.startswith("finemoe_batch_size")],
        "server_stderr_tail": stop_log[-1500:],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    speedup = record["speedup_max_vs_1_client"]
    log.info("%s\nthroughput at %d clients = %.2fx one client", table(record), clients[-1], speedup)
    log.info("wrote %s and %s", out, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
