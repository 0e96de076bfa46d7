#!/usr/bin/env bash
# The trace-routed GPU campaign of issue 7, one part per device call (each under ~9 minutes on
# the H200, measured 2026-11-29). Traces in gpu_traces/ (ignored by git; carry the part's files,
# e.g. carry=["gpu_traces/q128x8_test.fmt", "gpu_traces/q128x8_hist.fmt"]: a call carries 64 MiB):
#   q60x4_test.fmt (8 requests) + q60x4_hist.fmt (24)     ~36 MiB   for qwen15 / serve15
#   q128x8_test.fmt (8 requests) + q128x8_hist.fmt (16)   ~58 MiB   for qwen3
#   m8x2_test.fmt (16 requests) + m8x2_hist.fmt (32)        ~9 MiB   for mixtral
# made with benchmarks/slim_trace.py from traces recorded as in docs/results/gpu_trace.md.
# Usage: bash benchmarks/gpu_campaign.sh PART OUTDIR
set -euo pipefail
part=$1 out=${2:-$OUT}
export PYTHONPATH=src
B="python benchmarks/bench_offload.py"
POL=lru,mixtral-offloading,promoe,moe-infinity,finemoe
# Trace-routed runs at a 25% budget, 2 interleaved rounds, one function per shape and its traces:
#   q15|q3|mix SECONDS POLICIES RECORD LINES   (timeout, --policies, record name under $out, table lines shown)
q15() {
  timeout "$1" $B --shape qwen15moe --trace gpu_traces/q60x4_test.fmt --trace-requests 3 \
    --history gpu_traces/q60x4_hist.fmt --history-requests 24 --budgets 25% --repeats 2 --skip-loop \
    --policies "$2" --out "$out/$3" 2>&1 | grep -v "engine ready" | tail -"$4"
}
q3() {
  timeout "$1" $B --shape qwen3_30b --trace gpu_traces/q128x8_test.fmt --trace-requests 2 \
    --history gpu_traces/q128x8_hist.fmt --history-requests 12 --budgets 25% --repeats 2 --skip-loop \
    --policies "$2" --out "$out/$3" 2>&1 | grep -v "engine ready" | tail -"$4"
}
mix() {
  timeout "$1" $B --shape mixtral --layers 16 --trace gpu_traces/m8x2_test.fmt --trace-requests 2 \
    --history gpu_traces/m8x2_hist.fmt --history-requests 12 --budgets 25% --repeats 2 --skip-loop \
    --policies "$2" --out "$out/$3" 2>&1 | grep -v "engine ready" | tail -"$4"
}
# Accelerate side by side with lru and finemoe at 50% and 25%, 1 round, 1 request:
#   acc SECONDS SHAPE TEST_TRACE HIST_TRACE HIST_REQUESTS ACCELERATE_TOKENS RECORD   (traces: names in gpu_traces/)
acc() {
  timeout "$1" $B --shape "$2" --trace "gpu_traces/$3.fmt" --trace-requests 1 \
    --history "gpu_traces/$4.fmt" --history-requests "$5" --policies lru,finemoe --budgets 50%,25% \
    --repeats 1 --skip-loop --accelerate --accelerate-budgets 50%,25% --accelerate-tokens "$6" \
    --out "$out/$7" 2>&1 | grep -v "engine ready" | tail -12
}
# One Qwen1.5 and one Qwen3 run, 25%, 2 rounds, on the slim traces (carry q60x4_t3, q60x4_h16,
# q128x8_t2, q128x8_hist: 56 MB):   pair POLICIES QWEN15_RECORD QWEN3_RECORD
pair() {
  timeout 170 $B --shape qwen15moe --trace gpu_traces/q60x4_t3.fmt --trace-requests 3 \
    --history gpu_traces/q60x4_h16.fmt --history-requests 16 --budgets 25% --repeats 2 --skip-loop \
    --policies "$1" --out "$out/$2" 2>&1 | grep -v "engine ready" | tail -7
  timeout 280 $B --shape qwen3_30b --trace gpu_traces/q128x8_t2.fmt --trace-requests 2 \
    --history gpu_traces/q128x8_hist.fmt --history-requests 12 --budgets 25% --repeats 2 --skip-loop \
    --policies "$1" --out "$out/$3" 2>&1 | grep -v "engine ready" | tail -7
}
# Like pair, one shape per call, with --gc-freeze and one untimed request after each reconfiguration
# (finemoe's adaptive duty past its first probe, as in a long-running engine):   steady SHAPE POLICIES RECORD
steady() {
  if [ "$1" = q15 ]; then
    timeout 300 $B --shape qwen15moe --trace gpu_traces/q60x4_t3.fmt --trace-requests 3 \
      --history gpu_traces/q60x4_h16.fmt --history-requests 16 --budgets 25% --repeats 2 --skip-loop \
      --gc-freeze --warm-requests 1 --policies "$2" --out "$out/$3" 2>&1 | grep -v "engine ready" | tail -8
  else
    timeout 500 $B --shape qwen3_30b --trace gpu_traces/q128x8_t2.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 12 --budgets 25% --repeats 2 --skip-loop \
      --gc-freeze --warm-requests 1 --policies "$2" --out "$out/$3" 2>&1 | grep -v "engine ready" | tail -8
  fi
}
EARLY="lru,lru+early_issue_misses=2,finemoe,finemoe+early_issue_misses=2"
M=device:graph-gates+gather  # finemoe's mode in the overhead parts of sessions 41-45
# The reference shape at 99% on the H200: finemoe's frozen and learning arms and a learning arm with one more
# mode flag, paired rounds over lru:gather (sessions 41-44):   learnpair SECONDS ROUNDS FLAG RECORD
learnpair() {
  timeout "$1" python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
    --rounds "$2" --prompts 2 --warm-pool --near-full-only --lru-modes gather \
    --modes "$M,$M+learn,$M+learn+$3" \
    --out "$out/$4" 2>&1 | grep -v INFO | grep -A10 "^run " | cut -c1-150 | head -11
}
# The same arms with GPU marks (session 45):   marked SECONDS ROUNDS MODES RECORD
marked() {
  timeout "$1" python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
    --rounds "$2" --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks --modes "$3" \
    --out "$out/$4" 2>&1 | grep -v INFO | grep -E "^run |^finemoe|^lru:gather|between replayed|last round, decode" \
    | cut -c1-400 | head -30
}
# The GPU suite, then issue 5's replay speed on one pinned host core (sessions 42-44; carry
# gpu_traces/ref40_test.fmt and gpu_traces/ref_hist_stores.pt):   suite_speed SESSION
suite_speed() {
  timeout 330 python -m pytest -q tests/gpu 2>&1 | tail -4
  timeout 200 taskset -c 3 python benchmarks/sim_speed.py --traces gpu_traces/ref40_test.fmt \
    --history-cache gpu_traces/ref_hist_stores.pt --policies lru,finemoe --repeat 5 --limit 40 \
    --out "$out/sim_speed_h200host_$1.json" 2>&1 | grep -v "^    .*µs" | tail -3
}
case $part in
  s18a)     # session 18: GPU tests, the map predictor's cache probe on the host, then Qwen3 25% with
            # fewer map prefetches in decode (a precision floor; k experts per plan) beside lru and
            # finemoe (carry q128x8_t2 and q128x8_hist; ~8 min)
    python -m pytest -q -rf --tb=line tests/gpu 2>&1 | tail -4 || true
    python benchmarks/predictor_cache_probe.py --out "$out/predictor_cache_probe_gpu_host.json" | tail -3
    steady q3 "lru,finemoe,finemoe+map_min_precision=0.4,finemoe+delta_rule='topk'" s18_qwen3_30b_fewer.json ;;
  s20q3)    # prepared in session 19, not yet run: Qwen3 25% always predicting, with and without its
            # prefetch copies (prefetch_copies=False: the plans' host time and eviction hints only),
            # beside lru: is it the host time or the copies that make prediction lose? (carry as s19q3)
    A="prediction_duty='always'"
    steady q3 "lru,finemoe+$A,finemoe+$A+prefetch_copies=False,finemoe+$A+search='process'" \
      s20_qwen3_30b_host_or_copies.json ;;
  ovhpin)   # the overhead protocol proposed in session 19 (not yet run): the process pinned to 6 host
            # cores, the collector frozen, 5 rounds x 2 prompts, added step = median of same-round differences
    timeout 500 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 5 --prompts 2 --modes "${MODES:-sync,process}" \
      --out "$out/overhead_gpu_reference_${TAG:-pinned}.json" 2>&1 | grep -v " INFO \|round" | tail -14 ;;
  s19ovh)   # session 19: the predictor's critical-path overhead with the speculative gates computed in
            # the graph (sync, process) beside the host gate (sync:host-gate), one run (~5 min)
    timeout 420 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 3 --prompts 3 --modes "${MODES:-sync,sync:pump-first,sync:graph-gates,process}" --out "$out/overhead_gpu_reference_${TAG:-s19}.json" 2>&1 \
      | grep -v " INFO \|round" | tail -14 ;;
  s19q3)    # session 19: Qwen3 25%, the speculative gate in the graph and on the host, beside lru
            # (carry q128x8_t2 and q128x8_hist; ~6 min)
    steady q3 "lru,finemoe,finemoe+graph_gates=False" s19_qwen3_30b_graph_gates.json ;;
  s19q3a)   # session 19: s19q3 with prediction always on (the duty kept it off in s19q3), ~4 min
    steady q3 "lru,finemoe+prediction_duty='always',finemoe+prediction_duty='always'+graph_gates=False" \
      s19_qwen3_30b_graph_gates_always.json ;;
  s19q3b)   # session 19: always predicting on Qwen3, with fewer map prefetches (a precision floor,
            # k per plan): the comparison the thirteenth campaign meant to make (carry as s19q3; ~4 min)
    A="prediction_duty='always'"
    steady q3 "lru,finemoe+$A,finemoe+$A+map_min_precision=0.5,finemoe+$A+delta_rule='topk'" \
      s19_qwen3_30b_fewer_always.json ;;
  s19q15)   # session 19: the same on Qwen1.5 (carry q60x4_t3 and q60x4_h16; ~5 min)
    steady q15 "lru,finemoe,finemoe+graph_gates=False" s19_qwen15moe_graph_gates.json ;;
  s21q3)    # session 21: Qwen3 25% always predicting (as s20q3): do plans two layers ahead land in time?
            # the maps at distance 2 with and without the one-layer gate (carry as s19q3; ~8 min)
    A="prediction_duty='always'"
    steady q3 "lru,finemoe+$A,finemoe+$A+prefetch_distance=2,finemoe+$A+prefetch_distance=2+gate_refine=False" \
      s21_qwen3_30b_distance.json ;;
  s24q3)    # session 24: where finemoe's extra host time outside the predictors goes (~160 us per layer
            # in s20q3: TPOT - sync - critical against lru). Always predicting, no prefetch copies, the
            # map search inline (sync), on its thread (async, the default) or in a process: if the
            # searcher thread's GIL holds are the cause, sync's other host time falls to lru's
            # (carry q128x8_t2 and q128x8_hist; ~9 min)
    A="prediction_duty='always'+prefetch_copies=False"
    steady q3 "lru,finemoe+$A,finemoe+$A+search='sync',finemoe+$A+search='process'" \
      s24_qwen3_30b_host_split.json ;;
  s24q3b)   # session 24, after s24q3 (sync's other host time fell ~4 ms per token against async): the
            # same with the prefetch copies on, beside the no-copy pair again (carry as s24q3; ~9 min)
    A="prediction_duty='always'"
    steady q3 "lru,finemoe+$A,finemoe+$A+search='sync',finemoe+$A+prefetch_copies=False,finemoe+$A+prefetch_copies=False+search='sync'" \
      s24_qwen3_30b_sync_copies.json ;;
  s24q3c)   # session 24, final library: the GPU tests, then the layers' serve timed around each launch
            # (serve_decode_s, launch_decode_s, post_launch_decode_s) for lru and finemoe always
            # predicting, with and without copies (carry as s24q3; ~8 min)
    python -m pytest -q -rf --tb=short tests/gpu 2>&1 | tail -30
    A="prediction_duty='always'"
    steady q3 "lru,finemoe+$A+prefetch_copies=False,finemoe+$A" s24_qwen3_30b_serve_split.json ;;
  s21|s22|s23|s24)  # sessions 21-24: the GPU tests, then the replay's speed on one pinned host core, this
            # tree and (alternated) another one's src/ copied to out/base_src (carry
            # gpu_traces/ref40_test.fmt, gpu_traces/ref_hist.fmt, out/base_src; ~7 min). Records named by
            # part. s23 runs the bf16 parity test once more (it had failed intermittently with search="async")
    python -m pytest -q -rf --tb=short tests/gpu 2>&1 | tail -30
    if [ "$part" = s23 ]; then python -m pytest -q -rf --tb=short tests/gpu/test_cuda.py -k bf16 2>&1 | tail -4; fi
    lscpu | grep "Model name"
    T="--traces gpu_traces/ref40_test.fmt --history gpu_traces/ref_hist.fmt --limit 40"
    taskset -c 3 python benchmarks/sim_speed.py $T --repeat 3 --policies lru,on-demand,finemoe \
      --out "$out/sim_speed_h200host_$part.json" 2>&1 | tail -4
    taskset -c 3 python benchmarks/sim_speed_ab.py --base-src out/base_src $T --policy finemoe --rounds 8 \
      --out "$out/sim_speed_ab_h200host_$part.json" 2>&1 | tail -4 ;;
  s19t)     # session 19: the GPU tests, failures in full (~4 min)
    python -m pytest -q -rf --tb=short tests/gpu 2>&1 | tail -30 ;;
  s18ovh)   # session 18: the predictor's critical-path overhead, inline search only (~3 min)
    timeout 400 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 2 --prompts 3 --modes sync --out "$out/overhead_gpu_reference_s18.json" 2>&1 \
      | grep -v " INFO \|round" | tail -8 ;;
  s17a)     # session 17: GPU tests, then a decode step's first copy issued before its other victims are
            # found (early_issue_misses=2) against all at once, lru and finemoe, Qwen1.5 25% (carry
            # q60x4_t3 and q60x4_h16, 21 MB; ~6 min)
    python -m pytest -q tests/gpu 2>&1 | tail -2
    steady q15 "$EARLY" s17_qwen15moe_early.json ;;
  s17b)     # session 17: the same on Qwen3 (carry q128x8_t2 and q128x8_hist; ~5 min)
    steady q3 "$EARLY" s17_qwen3_30b_early.json ;;
  s17c)     # session 17, final code: GPU tests, then Qwen3 again with the early issue the default and
            # off (16: prefill layers only) in the same run (carry as s17b; ~6 min)
    python -m pytest -q tests/gpu 2>&1 | tail -2
    steady q3 "lru+early_issue_misses=16,lru,finemoe+early_issue_misses=16,finemoe" s17_qwen3_30b_early2.json ;;
  s17ovh)   # session 17: the predictor's critical-path overhead, inline search only (~3 min)
    timeout 400 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 2 --prompts 3 --modes sync --out "$out/overhead_gpu_reference_s17.json" 2>&1 \
      | grep -v " INFO \|round" | tail -8 ;;
  s33)      # session 33's first call (~9 min): the full GPU suite, then the near-full overhead comparison,
            # 12 paired rounds (finemoe device:graph-gates+gather against lru:gather; session 32's s32e)
    timeout 270 python -m pytest -q -rf --tb=short tests/gpu > "$out/gpu_tests.txt" 2>&1 || true
    tail -4 "$out/gpu_tests.txt"
    timeout 200 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 12 --prompts 2 --warm-pool --no-eviction-reference --near-full-only \
      --modes device:graph-gates+gather --lru-modes gather --out "$out/overhead_s33.json" 2>&1 \
      | grep -v "ms per iteration)" | grep -v INFO | tail -20
    # issue 5's replay speed on one pinned host core, if the traces were carried
    # (carry=["gpu_traces/ref40_test.fmt", "gpu_traces/ref_hist_stores.pt"], ~18 MiB)
    if [ -f gpu_traces/ref40_test.fmt ] && [ -f gpu_traces/ref_hist_stores.pt ]; then
      timeout 120 taskset -c 3 python benchmarks/sim_speed.py --traces gpu_traces/ref40_test.fmt \
        --history-cache gpu_traces/ref_hist_stores.pt --policies lru,finemoe --repeat 3 --limit 20 \
        --out "$out/sim_speed_h200host_s33.json" 2>&1 | tail -3
    fi ;;
  s34)      # session 34's first call (~7 min): the full GPU suite, then 12 paired rounds at 99% with
            # the eviction reference (decay-lfu:gather) and the drain timeline of the last layers
    timeout 270 python -m pytest -q -rf --tb=short tests/gpu > "$out/gpu_tests.txt" 2>&1 || true
    tail -4 "$out/gpu_tests.txt"
    timeout 260 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 12 --prompts 2 --warm-pool --near-full-only \
      --modes device:graph-gates+gather --lru-modes gather --out "$out/overhead_s34.json" 2>&1 \
      | grep -v INFO | grep -A12 "^run \|routings on the host" | cut -c1-180 | head -40 ;;
  s35)      # session 35's first call (~8 min): the full GPU suite (first GPU run of 543feee's side wait,
            # 5c65254's set_stream side launches and the embedding switches), then 16 paired rounds at
            # 99% with the eviction reference: default, the embedding's stream at the highest priority
            # (`embed-prio`: the drain's start waits for that embedding), and also launched right after
            # S_0 (`embed-early`). Ran at ae48376; `embed-prio` is the default since and the flag is refused now (s35b)
    timeout 200 python -m pytest -q -rf --tb=short tests/gpu > "$out/gpu_tests.txt" 2>&1 || true
    tail -4 "$out/gpu_tests.txt"
    timeout 330 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 16 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+embed-prio,device:graph-gates+gather+embed-prio+embed-early \
      --out "$out/overhead_s35.json" 2>&1 | grep -v INFO \
      | grep -A9 "^run \|routings on the host\|between replayed\|last routing sync" | cut -c1-180 | head -64 ;;
  s35b)     # session 35's confirmation (~5 min): the embedding on the highest-priority stream is the
            # default since s35 (s35's `embed-prio`, which ran at ae48376); 20 paired rounds at 99% of the
            # CUDA defaults beside `embed-noprio` (the old default) and both references
    timeout 420 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 20 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+embed-noprio \
      --out "$out/overhead_s35b.json" 2>&1 | grep -v INFO \
      | grep -A7 "^run \|between replayed\|last routing sync" | cut -c1-180 | head -48 ;;
  s35c)     # session 35 (~6 min): the GPU-side probe's test, then 16 paired rounds at 99% with every
            # replayed step timed on the GPU (`--gpu-marks`: idle between steps, S_0 to the last router,
            # the rest): where finemoe's later last routing read comes from; beside it, the segments'
            # streams at the highest priority and the side graphs' at the lowest (`prio`)
    timeout 150 python -m pytest -q -rf --tb=short tests/gpu/test_graphs.py -k step_marks 2>&1 | tail -3
    timeout 400 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 16 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather,device:graph-gates+gather+prio \
      --out "$out/overhead_s35c.json" 2>&1 | grep -v INFO \
      | grep -A7 "^run \|between replayed\|last routing sync\|on the GPU" | cut -c1-180 | head -60 ;;
  s35d)     # session 35, after s35c (finemoe's GPU idles ~75 µs longer between steps and its tail is
            # ~30 µs longer; the step's body is not slower): the probe's test, then 14 paired rounds with the
            # host's between-step spans split at the token's feed and the side graphs' end timed against
            # the step's, beside `no-side-wait` (the next step does not wait for the side graphs; a probe)
    timeout 150 python -m pytest -q -rf --tb=short tests/gpu/test_graphs.py -k step_marks 2>&1 | tail -3
    timeout 400 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 14 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather,device:graph-gates+gather+no-side-wait \
      --out "$out/overhead_s35d.json" 2>&1 | grep -v INFO \
      | grep -A7 "^run \|between replayed\|last routing sync\|on the GPU" | cut -c1-180 | head -60 ;;
  s35e)     # session 35, after s35d (the host reads the last routing late and the GPU tail is long): the
            # tail split at the last segment's launch (`to_last_launch`), 10 paired rounds, no test (~4 min)
    timeout 280 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 10 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather --out "$out/overhead_s35e.json" 2>&1 | grep -v INFO \
      | grep -A7 "^run \|last routing sync\|on the GPU" | cut -c1-180 | head -40 ;;
  s36)      # prepared in session 35, not yet run (~8 min): the full GPU suite (first GPU run of the
            # drained routings' deferral, `defer_drained_plans`, and its test), then 16 paired rounds at
            # 99% with GPU marks: the default beside `defer-late` (the drained routings' predictor work
            # after the sync layer's launch once its router is done) and `defer-all`. Expect the
            # `to_last_launch` column to fall toward the references' if the late drain is the cost
    timeout 210 python -m pytest -q -rf --tb=short tests/gpu > "$out/gpu_tests.txt" 2>&1 || true
    tail -4 "$out/gpu_tests.txt"
    timeout 360 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 16 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather,device:graph-gates+gather+defer-late,device:graph-gates+gather+defer-all \
      --out "$out/overhead_s36.json" 2>&1 | grep -v INFO \
      | grep -A9 "^run \|last routing sync\|on the GPU\|on one clock\|link per" | cut -c1-180 | head -80 ;;
  s36sim)   # prepared in session 35 (~1.5 min): issue 5's replay speed on one pinned core of the GPU
            # machine's host, the counted figure (this machine gave lru 198.9k / finemoe 20.4k that day,
            # sim_speed_s35.json); carry=["gpu_traces/ref40_test.fmt", "gpu_traces/ref_hist_stores.pt"]
    timeout 200 taskset -c 3 python benchmarks/sim_speed.py --traces gpu_traces/ref40_test.fmt \
      --history-cache gpu_traces/ref_hist_stores.pt --policies lru,on-demand,finemoe --repeat 5 --limit 40 \
      --profile 25 --out "$out/sim_speed_h200host_s36.json" 2>&1 | grep -v "^    .*µs" | tail -4
    # (the per-function profile is in the record: compare it with this machine's, `sim_speed.py --profile 25`;
    # finemoe / lru there 0.075-0.081, here 0.086-0.103: finemoe's functions lose ~20% more there)
    ;;
  s36b)     # session 36 (~8.5 min): the GPU suite (the early routing read's first GPU run), 12 paired
            # rounds at 99% with GPU marks: the early read of the last sync's ids (the default) beside
            # the blocking copy (`no-early-read`) for lru:gather and finemoe; then s36sim's replay speed
            # (carry=["gpu_traces/ref40_test.fmt", "gpu_traces/ref_hist_stores.pt"])
    timeout 195 python -m pytest -q -rf --tb=short tests/gpu > "$out/gpu_tests.txt" 2>&1 || true
    tail -4 "$out/gpu_tests.txt"
    timeout 265 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 12 --prompts 2 --warm-pool --near-full-only --lru-modes gather+no-early-read,gather \
      --gpu-marks --modes device:graph-gates+gather,device:graph-gates+gather+no-early-read \
      --out "$out/overhead_s36b.json" 2>&1 | grep -v INFO \
      | grep -A9 "^run \|on the GPU\|on one clock" | cut -c1-200 | head -60
    timeout 130 taskset -c 3 python benchmarks/sim_speed.py --traces gpu_traces/ref40_test.fmt \
      --history-cache gpu_traces/ref_hist_stores.pt --policies lru,on-demand,finemoe --repeat 5 --limit 40 \
      --profile 25 --out "$out/sim_speed_h200host_s36.json" 2>&1 | grep -v "^    .*µs" | tail -4 ;;
  s37)      # session 37 (~8 min): the GPU suite (first GPU run of the gate rows read as NumPy), then 12
            # paired rounds at 99% with GPU marks, the drain's per-layer parts and the between-step
            # spans split at decode's return
    timeout 200 python -m pytest -q -rf --tb=short tests/gpu > "$out/gpu_tests.txt" 2>&1 || true
    tail -4 "$out/gpu_tests.txt"
    timeout 270 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 12 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather --out "$out/overhead_s37.json" 2>&1 | grep -v INFO \
      | grep -A14 "^run \|the last layers' routings\|on one clock\|between replayed" | cut -c1-200 | head -80 ;;
  s37b)     # session 37 (~4 min on a slow host; s37's 200 s cut the suite at 68%): the GPU suite alone
    timeout 400 python -m pytest -q -rf --tb=short tests/gpu > "$out/gpu_tests.txt" 2>&1 || true
    tail -6 "$out/gpu_tests.txt" ;;
  s37c)     # session 37 (~5 min): s37's comparison confirmed over 24 paired rounds (no test)
    timeout 560 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 24 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather --out "$out/overhead_s37c.json" 2>&1 | grep -v INFO \
      | grep -A14 "^run \|the last layers' routings\|on one clock\|between replayed" | cut -c1-200 | head -80 ;;
  s37d)     # session 37 (~4 min): 16 paired rounds without the GPU marks (`--gpu-marks` records a
            # side-stream event only in steps with side graphs: a few µs of host charged to finemoe alone)
    timeout 420 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 16 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather --out "$out/overhead_s37d.json" 2>&1 | grep -v INFO \
      | grep -A7 "^run " | cut -c1-200 | head -20 ;;
  # s38 / s38b (session 38) ran the GPU suite and 12 paired rounds of the last layer's routing carried to
  # the next step's start at 27ca34e; reverted (no gain: `device_plans.md`, "Session 38")
  s38d)     # session 38 (~6 min): what finemoe's added step at 99% is made of: 16 paired rounds without
            # the GPU marks, the default against no prefetch copies (plans reach the policy only) and
            # against the maps without the refining gate
    timeout 570 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 16 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+no-copies,device:gather+no-gate \
      --out "$out/overhead_s38d.json" 2>&1 | grep -v INFO | grep -A9 "^run \|^link per" | cut -c1-200 | head -40 ;;
  s38e)     # session 38 (~5 min): s38d's three finemoe arms with the GPU marks (where each arm's step
            # grows on the GPU: idle between steps, the last segment's tail, the last launch), 12 rounds
    timeout 570 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 12 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather,device:graph-gates+gather+no-copies,device:gather+no-gate \
      --out "$out/overhead_s38e.json" 2>&1 | grep -v INFO \
      | grep -A9 "^run \|on the GPU\|on one clock\|between replayed" | cut -c1-200 | head -60 ;;
  s38f)     # session 38 (~4 min; carry .whl with py-spy's wheel, README of the device library): where the
            # host's time goes in the whole decode loop (steps and what is between them), finemoe against
            # finemoe's eviction without the predictor, 99%, the CUDA defaults, 25 s each at 500 Hz
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    for run in "finemoe --graph-gates" "lru --eviction decay-lfu"; do
      tag=${run%% *}
      timeout 120 /tmp/site/bin/py-spy record -r 500 --nonblocking -f raw -o "$out/prof_$tag.txt" -- \
        python benchmarks/decode_host_profile.py --budget 99% --policy $run --seconds 25 > /dev/null 2>&1
      python benchmarks/decode_host_profile.py --fold "$out/prof_$tag.txt" --root _generate_static --top 40 \
        | cut -c1-120
    done ;;
  s38sim)   # session 38 (~2 min): issue 5's replay speed on the H200 host (carry gpu_traces/ref40_test.fmt
            # and gpu_traces/ref_hist_stores.pt), one pinned core
    timeout 150 taskset -c 3 python benchmarks/sim_speed.py --traces gpu_traces/ref40_test.fmt \
      --history-cache gpu_traces/ref_hist_stores.pt --policies lru,on-demand,finemoe --repeat 5 --limit 40 \
      --profile 25 --out "$out/sim_speed_h200host_s38.json" 2>&1 | grep -v "^    .*µs" | tail -4 ;;
  s39a)     # session 39 (~7 min; carry gpu_traces/ref40_test.fmt, gpu_traces/ref_hist_stores.pt and .whl/ with
            # Cython 3.3.1's cp312 wheel: the image's 3.3.0 builds modules that crash in the replay): the
            # compiled hot modules (setup.py, built in place afresh) on the H200 host: the
            # replay's speed compiled against the sources alternated in one process, one pinned core; then
            # issue 4's overhead at 99% with the compiled build, 16 paired rounds without the GPU marks
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/cy .whl/cython-3.3.1-*.whl
    PYTHONPATH=/tmp/cy python -c "import Cython; print('Cython', Cython.__version__)"
    rm -rf build src/finemoe/*.so src/finemoe/_native_build.json
    FINEMOE_NATIVE=1 PYTHONPATH=/tmp/cy timeout 240 python setup.py -q build_ext --inplace -j 16 > /tmp/native_build.log 2>&1 || tail -20 /tmp/native_build.log
    python -c "import finemoe, finemoe._native as n; print('hot modules:', n.summary())"
    rm -rf out/pure_src && mkdir -p out/pure_src && cp -r src/finemoe out/pure_src/ && rm -f out/pure_src/finemoe/*.so
    for pol in finemoe lru; do
      timeout 150 taskset -c 3 python benchmarks/sim_speed_ab.py --base-src out/pure_src --traces \
        gpu_traces/ref40_test.fmt --history-cache gpu_traces/ref_hist_stores.pt --limit 40 --policy $pol \
        --rounds 8 --out "$out/sim_speed_ab_native_h200host_$pol.json" 2>&1 | tail -3
    done
    timeout 330 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 16 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather --out "$out/overhead_s39a.json" 2>&1 | grep -v INFO \
      | grep -A9 "^run \|^link per" | cut -c1-200 | head -24 ;;
  s40a)     # session 40 (~4 min): the GPU tests after the recorder's NumPy counts, the store's unit rows
            # and moe-infinity's one-op plans (pure Python)
    timeout 500 python -m pytest -q -rf --tb=short tests/gpu 2>&1 | tail -15 ;;
  s40b)     # session 40 (~5 min): what online learning (the engine's default) adds at 99%, 10 paired rounds:
            # the default device arm frozen at 1K maps against the same arm learning (its rows undone after
            # each run)
    timeout 570 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --cores 2-7 --rounds 10 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s40b.json" 2>&1 | grep -v INFO | grep -A9 "^run \|^link per" | cut -c1-200 | head -40 ;;
  s40d)     # session 40 (~6 min): s40b unpinned (its --cores pinning after torch's import gave 16 intra-op
            # threads 6 cores: the learning arm's CPU tensor ops then took ~38 ms per step), 6 rounds, then
            # the GPU tests
    timeout 200 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 6 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s40d.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | head -10
    timeout 360 python -m pytest -q -rf --tb=short tests/gpu 2>&1 | tail -6 ;;
  s44a)     # session 44 (~3 min): learning without the request matrices (record_requests=False, as the engine's
            # default without a map-store file; at bb71a9d the benchmark left it auto, which kept them in both arms:
            # record s44a0) against the same with them (`:requests`, the recorder as in sessions 41-43) and the
            # frozen arm, 14 paired rounds over lru:gather
    learnpair 560 14 requests overhead_s44a.json ;;
  s47a)     # session 47 (~4 min): where finemoe's host time before S_0 goes at session 46's code (s46f: the token fed
            # to S_0's launch +32 µs frozen, +42 learning over lru:gather), call by call and under cProfile
    timeout 300 python benchmarks/step_start_probe.py --profile --prompts 2 --new-tokens 32 \
      --configs "lru:gather,finemoe:device+graph-gates+gather,finemoe:device+graph-gates+gather+learn" \
      --out "$out/step_start_s47a.json" 2>&1 | grep -v "INFO\|^\[" | cut -c1-900 | head -60 ;;
  s46f)     # session 46's second run, run first in session 47 (~9 min): the whole GPU suite at session 46's final code (s46e ran
            # only test_graphs.py there), then s46e's arms again, 14 paired rounds: a second run of the greedy token
            # taken in the last graph against the host's argmax, frozen and learning
    timeout 200 python -m pytest -q tests/gpu 2>&1 | tail -3
    timeout 360 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 14 --prompts 2 --warm-pool --near-full-only --no-eviction-reference --gpu-marks \
      --lru-modes "gather+host-argmax,gather" --modes "$M,$M+host-argmax,$M+learn,$M+learn+host-argmax" \
      --out "$out/overhead_$part.json" 2>&1 | grep -v INFO | grep -A8 "^run " | cut -c1-150 | head -9 ;;
  s46e)     # session 46 (~6 min): a replayed step's greedy token taken in its last graph (`graph_argmax`, the new
            # default) against the host's argmax after the step (`host-argmax`, as before), lru:gather and finemoe
            # frozen and learning each way, 12 paired rounds with GPU marks; the graph tests first
    timeout 150 python -m pytest -q tests/gpu/test_graphs.py 2>&1 | tail -3
    timeout 300 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 12 --prompts 2 --warm-pool --near-full-only --no-eviction-reference --gpu-marks \
      --lru-modes "gather+host-argmax,gather" --modes "$M,$M+host-argmax,$M+learn,$M+learn+host-argmax" \
      --out "$out/overhead_$part.json" 2>&1 | grep -v INFO | grep -E "^run |^finemoe|^lru:gather|between replayed" \
      | cut -c1-220 | head -24 ;;
  s46d)     # session 46 (~4 min): issue 5's replay speed on one pinned host core (carry gpu_traces/ref40_test.fmt and
            # gpu_traces/ref_hist_stores.pt)
    timeout 230 taskset -c 3 python benchmarks/sim_speed.py --traces gpu_traces/ref40_test.fmt \
      --history-cache gpu_traces/ref_hist_stores.pt --policies lru,finemoe --repeat 5 --limit 40 \
      --out "$out/sim_speed_h200host_s46.json" 2>&1 | grep -v "^    .*µs" | tail -3 ;;
  s46c)     # session 46 (~5 min): s46b's `to_fed` (the step's end to the next token fed) was +52 µs frozen and +96
            # learning over lru:gather: is it the prefetch copies in flight at the step's end? Frozen beside frozen
            # planning without copies (`no-copies`) and learning, 12 paired rounds with GPU marks
    marked 280 12 "$M,$M+no-copies,$M+learn" overhead_$part.json ;;
  s46b)     # session 46 (~6 min): where the GPU idles between steps (frozen +65 µs over lru:gather, learning +110 in
            # s46a): the new `to_fed` mark (the step's end to the host's feed of the next token, on the GPU's clock)
            # splits the idle into the logits read and sampling, and the way from the token to the next S_0 launch
    timeout 150 python -m pytest -q tests/gpu/test_graphs.py -k step_marks 2>&1 | tail -2
    marked 280 14 "$M,$M+learn" overhead_$part.json ;;
  s46a)     # session 46 (~9 min): the GPU suite (session 45's last commits had not run on a GPU), then learning beside
            # learning whose replayed step does not wait for the last step's side graphs (`no-side-wait`, a probe), with
            # GPU marks, 14 paired rounds: is the GPU's longer idle between learning's steps that wait?
    timeout 330 python -m pytest -q tests/gpu 2>&1 | tail -4
    marked 235 14 "$M,$M+learn,$M+learn+no-side-wait" overhead_$part.json ;;
  s45e)     # session 45 (~4 min): does the next step wait for the step record on the GPU? learning beside learning whose
            # next step does not wait for the record (`no-record-wait`, a probe), 14 paired rounds with GPU marks
    marked 240 14 "$M,$M+learn,$M+learn+no-record-wait" overhead_$part.json ;;
  s45d)     # session 45 (~4 min): s45c's three arms again (a second paired run of learning against `take-now`)
    learnpair 230 14 take-now overhead_$part.json ;;
  s45c)     # session 45 (~9 min): the GPU suite at the session's code, then the frozen and learning arms beside learning
            # with the record waited for at the step's end (`take-now`, as before session 45), 14 paired rounds
            # without GPU marks (their event records sit on the finemoe arms' step boundary)
    timeout 330 python -m pytest -q tests/gpu 2>&1 | tail -4
    learnpair 230 14 take-now overhead_$part.json ;;
  s45b)     # session 45 (~5 min): a graphed learning step's record read at the next step's insert (`StepRecord.later`)
            # instead of waited for at the step's end (s45a: the host's late work at the last layer, 99 µs against
            # frozen's 23, ran past the GPU's end); the record's and graphed learning's tests first, then s45a's arms
    timeout 200 python -m pytest -q tests/gpu/test_step_record.py tests/gpu/test_graphs.py -k "step_map or graphed_learning" 2>&1 | tail -2
    marked 400 12 "$M,$M+learn" overhead_s45b.json ;;
  s45a)     # prepared in session 44, ran in session 45 (~4 min): where learning's ~0.1 ms over frozen goes. The frozen and
            # learning arms with GPU marks, 10 paired rounds, and the last round's host parts of the held-back insert
            # (`store.apply_pending`, `store._write`), the mirror's row copy (`mirror.sync`) and the record's read
            # (`record.take`) printed beside the predictors'
    marked 500 10 "$M,$M+learn" overhead_s45a.json ;;
  s44d|s44e)  # session 44 (~4 min): a graphed learning step's insert scored on the device (the default with
            # search=device) against the host's scoring (`:host-insert`, as before) and the frozen arm, 14 paired
            # rounds over lru:gather; the tests of the record, the device mirror and graphed learning first. s44d ran
            # at 0eb3f4d (the scores in the record's own graph, `take` waiting for them); s44e at the next commit (the
            # scores in a graph of their own after the record, read at the insert). Both reverted (no gain in the
            # step, paired: s44e's median +0.01 ms, 6 of 14 rounds negative): re-running needs a checkout of 0b89717,
            # whose `host-insert` flag today's predictor_overhead.py refuses
    timeout 200 python -m pytest -q tests/gpu/test_graphs.py tests/gpu/test_device_plans.py \
      -k "scored_on_the_device or graphed_learning or step_record or sync or record" 2>&1 | tail -2
    learnpair 380 14 host-insert overhead_$part.json ;;
  s44c)     # session 44 (~5 min; ran on a56d907's tree, reverted: the helper thread (`insert_ahead`) and its flag
            # `insert-inline` are gone, so re-running this part needs a checkout of that commit): the helper thread's
            # tests, then learning with the insert scored on a helper thread against the same scored inline and the
            # frozen arm, 14 paired rounds over lru:gather
    timeout 150 python -m pytest -q tests/gpu/test_graphs.py -k "helper_thread or graphed_learning" 2>&1 | tail -2
    learnpair 420 14 insert-inline overhead_s44c.json ;;
  s44b)     # session 44 (~6 min; carry gpu_traces/ref40_test.fmt and gpu_traces/ref_hist_stores.pt): the GPU suite,
            # then issue 5's replay speed on the host, one pinned core (as s43b)
    suite_speed s44 ;;
  s43a)     # session 43 (~7 min; ran on 2d98c7a, whose `count_layers` was reverted: on today's tree it measures the
            # per-layer counts): the recorder's counts in one pass per step: the frozen and the
            # learning arms, 12 paired rounds (as s42a), then the graphed learning GPU tests
    timeout 420 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 12 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s43a.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | head -10
    timeout 150 python -m pytest -q -x tests/gpu/test_graphs.py -k "learning or logits" 2>&1 | tail -3 ;;
  s43c)     # session 43 (~4 min; ran on 974c570, reverted: `count-each` was its probe, so re-running this part needs
            # a checkout of 974c570; today's predictor_overhead.py refuses the flag): s43a's learning arm against the
            # same with the counts made per layer as before (`count-each`), and the frozen arm, 14 paired rounds
    learnpair 500 14 count-each overhead_s43c.json ;;
  s43b)     # session 43 (~6 min; carry gpu_traces/ref40_test.fmt and gpu_traces/ref_hist_stores.pt): the GPU suite,
            # then issue 5's replay speed on the host, one pinned core (as s42b)
    suite_speed s43 ;;
  s42a)     # session 42 (~6 min): the frozen and the learning arms again, 12 paired rounds (s41e had 6), for a
            # steadier figure of each against lru:gather
    timeout 540 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 12 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s42a.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | head -10 ;;
  s42d)     # session 42 (~5 min; ran on a tree with `StepRecord.take_later`, reverted: no gain): the step's map read only when the store next needs it: the
            # graphed learning and logits GPU tests, s42c's arms with the GPU marks (8 rounds), then 12 rounds
            # without them (as s42a)
    timeout 200 python -m pytest -q -x tests/gpu/test_graphs.py -k "learning or logits" 2>&1 | tail -3
    timeout 150 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 8 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s42d_marks.json" 2>&1 | grep -v INFO \
      | grep -A9 "^run \|on the GPU\|on one clock" | cut -c1-160 | grep "^run\|finemoe\|lru:gather" | head -20
    timeout 200 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 12 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s42d.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | grep "^run\|finemoe" ;;
  s42c)     # session 42 (~5 min): where learning's added step sits on the GPU: s42a's two arms with the GPU
            # marks (idle between steps, the last segment's tail, the last launch), 8 rounds
    timeout 540 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 8 --prompts 2 --warm-pool --near-full-only --lru-modes gather --gpu-marks \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s42c.json" 2>&1 | grep -v INFO \
      | grep -A9 "^run \|on the GPU\|on one clock\|between replayed" | cut -c1-220 | head -70 ;;
  s42b)     # session 42 (~5 min; carry gpu_traces/ref40_test.fmt and gpu_traces/ref_hist_stores.pt): the GPU suite,
            # then issue 5's replay speed on the host, one pinned core
    suite_speed s42 ;;
  s41e)     # session 41 (~6 min): learning with the insert held back to the next step's first store read, with and
            # without the step record; the GPU suite
    learnpair 240 6 no-record overhead_s41e.json
    timeout 280 python -m pytest -q tests/gpu 2>&1 | tail -4 ;;
  s41d)     # session 41 (~3 min): learning with the step record and without it (`no-record`); run on e4d4ac6 plus the early launch
            # with a third arm, `+record-late` (the record launched at the last read, not a layer early): no gain, the
            # early launch and its flag were removed, `take` launches the record
    timeout 300 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 6 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn,device:graph-gates+gather+learn+no-record \
      --out "$out/overhead_s41d.json" 2>&1 | grep -v INFO | grep -A11 "^run " | cut -c1-150 | head -12 ;;
  s41c)     # session 41 (~5 min): s41b's overhead arms with the insert's semantic share made at the step's start, the GPU suite
    timeout 200 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 6 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s41c.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | head -10
    python benchmarks/insert_probe.py --threads 0,1 | head -2
    timeout 230 python -m pytest -q tests/gpu 2>&1 | tail -4 ;;
  s41b)     # session 41 (~3 min): s41a without the GPU suite, the record launched at its read
    timeout 170 python -m pytest -q -x tests/gpu/test_graphs.py -k "learning or logits" 2>&1 | tail -4
    timeout 200 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 6 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s41b.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | head -10 ;;
  s41a)     # session 41 (~7 min): the step record's GPU tests, s40e's overhead arms again, the GPU suite
    timeout 170 python -m pytest -q -x tests/gpu/test_graphs.py -k "learning or logits" 2>&1 | tail -4
    timeout 200 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 6 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s41a.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | head -10
    timeout 200 python -m pytest -q tests/gpu 2>&1 | tail -6 ;;
  s40e)     # session 40 (~2 min): s40d's overhead runs again once the recorder works per layer again
    timeout 200 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 6 --prompts 2 --warm-pool --near-full-only --lru-modes gather \
      --modes device:graph-gates+gather,device:graph-gates+gather+learn \
      --out "$out/overhead_s40e.json" 2>&1 | grep -v INFO | grep -A9 "^run " | cut -c1-150 | head -10 ;;
  s39b)     # session 39 (~5 min; carry .whl/ as s39a): the GPU tests with the compiled build
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/cy .whl/cython-3.3.1-*.whl
    FINEMOE_NATIVE=1 PYTHONPATH=/tmp/cy timeout 240 python setup.py -q build_ext --inplace -j 16 > /tmp/native_build.log 2>&1 || tail -20 /tmp/native_build.log
    python -c "import finemoe, finemoe._native as n; print('hot modules:', n.summary())"
    timeout 400 python -m pytest -q -rf --tb=short tests/gpu 2>&1 | tail -15
    python -c "import finemoe, finemoe._native as n; print('hot modules:', n.summary())" ;;
  tests)    # ~2 min
    python -m pytest -q tests/gpu 2>&1 | tail -15 ;;
  qwen15)   # history ~100 s, 2 rounds x 12 configs x 3 requests ~250 s, Accelerate 25% ~40 s
    timeout 560 $B --shape qwen15moe --trace gpu_traces/q60x4_test.fmt --trace-requests 3 \
      --history gpu_traces/q60x4_hist.fmt --history-requests 24 --policies $POL --budgets 50%,25% \
      --repeats 2 --skip-loop --accelerate --accelerate-budgets 25% --accelerate-tokens 3 \
      --out "$out/offload_qwen15moe_trace.json" 2>&1 | grep -v "engine ready" | tail -25 ;;
  serve15)  # online run only: history ~100 s, 1 round, serving 3 policies x 8 requests ~120 s
    timeout 560 $B --shape qwen15moe --trace gpu_traces/q60x4_test.fmt --trace-requests 3 \
      --history gpu_traces/q60x4_hist.fmt --history-requests 24 --policies lru,finemoe --budgets 25% \
      --repeats 1 --skip-loop --serve-requests 8 --serve-policies lru,mixtral-offloading,promoe,finemoe \
      --out "$out/serve_qwen15moe_trace.json" 2>&1 | grep -v "engine ready" | tail -25 ;;
  qwen3)    # GPU tests ~85 s; offload ~40 s, history ~110 s, 2 rounds x 9 configs x 2 requests ~250 s
    python -m pytest -q tests/gpu 2>&1 | tail -3
    timeout 480 $B --shape qwen3_30b --trace gpu_traces/q128x8_test.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 12 --policies "$POL,finemoe+map_min_score=0.8" \
      --budgets 25% --repeats 2 --skip-loop --out "$out/offload_qwen3_30b_trace.json" 2>&1 \
      | grep -v "engine ready" | tail -14 ;;
  mixtral)  # GPU tests, then the Mixtral-8x7B shape, first 16 of 32 layers (the plain twin kept for
            # reference fits the GPU twice: 2 x 47 GB), routing from an 8x2 reference trace
            # (gpu_traces/m8x2_*.fmt); ~6 min on the H200 (session 8)
    python -m pytest -q tests/gpu 2>&1 | tail -4
    timeout 470 $B --shape mixtral --layers 16 --trace gpu_traces/m8x2_test.fmt --trace-requests 2 \
      --history gpu_traces/m8x2_hist.fmt --history-requests 12 --policies lru,mixtral-offloading,promoe,finemoe \
      --budgets 50%,25% --repeats 2 --skip-loop --out "$out/offload_mixtral16_trace_b.json" 2>&1 \
      | grep -v "engine ready" | tail -16 ;;
  proc15)   # session 9: finemoe's map search in a worker process against the inline search, Qwen1.5 25%
            # (history ~100 s, 2 rounds x 6 configs x 3 requests ~250 s)
    q15 560 "lru,promoe,finemoe,finemoe+search='process'" process_qwen15moe_trace.json 12 ;;
  duty15)   # session 9: the adaptive prediction duty (finemoe's default on CUDA) against always predicting,
            # Qwen1.5 25% (~4 min)
    q15 560 "lru,promoe,finemoe,finemoe+prediction_duty='always'" duty_qwen15moe_trace.json 12 ;;
  dutymix)  # the same on the link-bound Mixtral-8x7B shape (16 layers), 25% (~5 min)
    mix 560 "lru,finemoe,finemoe+prediction_duty='always'" duty_mixtral16_trace.json 12 ;;
  duty3)    # the same on Qwen3-30B-A3B, 25% (~5 min)
    q3 560 "lru,finemoe,finemoe+prediction_duty='always'" duty_qwen3_30b_trace.json 10 ;;
  duty3b)   # after the stale-protection fix: finemoe (adaptive) and finemoe with LRU eviction, Qwen3 25%
    q3 330 "lru,finemoe,finemoe+eviction='lru'" duty_qwen3_30b_trace_b.json 10 ;;
  s10q3)    # session 10: finemoe with no prefill plans and the interleaved duty, against the old prefill
            # plans and always predicting, Qwen3 25% (~7 min)
    q3 560 "lru,finemoe,finemoe+prefill_plans='maps',finemoe+prediction_duty='always'" s10_qwen3_30b_trace.json 10 ;;
  s10q15)   # the same on Qwen1.5-MoE, 25% (~5 min)
    q15 560 "lru,finemoe,finemoe+prefill_plans='maps',finemoe+prediction_duty='always'" s10_qwen15moe_trace.json 10 ;;
  s10mix)   # the same on the link-bound Mixtral-8x7B shape (16 layers), 25% (~5 min)
    mix 560 "lru,finemoe,finemoe+prefill_plans='maps'" s10_mixtral16_trace.json 10 ;;
  s11evict) # session 11: finemoe (decayed-frequency eviction) against finemoe with LRU eviction and plain
            # LRU, Qwen3 25% (~6 min)
    q3 420 "lru,finemoe,finemoe+eviction='lru'" s11_qwen3_30b_evict.json 10 ;;
  s12g)     # session 12: graphed decode (cuda_graphs) — its GPU tests, then an 8-layer Qwen3 shape with its own
            # routing: eager against graphed steps, all-gpu / lru / finemoe at 25% (~5 min)
    python -m pytest -q tests/gpu/test_graphs.py 2>&1 | tail -25 || true
    timeout 300 $B --shape qwen3_30b --layers 8 --budgets 25% --repeats 2 --new-tokens 32 --skip-loop \
      --policies "all-gpu+cuda_graphs=False,lru+cuda_graphs=False,lru,finemoe+cuda_graphs=False,finemoe" \
      --out "$out/s12_graphs_qwen3_8l.json" 2>&1 | grep -v "engine ready" | tail -12 ;;
  s12q15)   # session 12: graphed decode (now the CUDA default) for every policy, eager lru / finemoe / all-gpu
            # next to them, Qwen1.5 25% trace-routed; first the GPU tests (~3 + 5 min)
    python -m pytest -q tests/gpu/test_graphs.py 2>&1 | tail -4 || true
    q15 470 "all-gpu+cuda_graphs=False,lru+cuda_graphs=False,finemoe+cuda_graphs=False,$POL" s12_qwen15moe_trace.json 14 ;;
  s12q15b)  # after the graphed-step prefetch fix (5cfa275), with finemoe always predicting too (~4 min)
    q15 470 "all-gpu+cuda_graphs=False,lru+cuda_graphs=False,finemoe+cuda_graphs=False,$POL,finemoe+prediction_duty='always'" s12_qwen15moe_trace_b.json 15 ;;
  s12q3)    # the same on Qwen3-30B-A3B (~7 min)
    q3 470 "all-gpu+cuda_graphs=False,lru+cuda_graphs=False,finemoe+cuda_graphs=False,$POL,finemoe+prediction_duty='always'" s12_qwen3_30b_trace.json 15 ;;
  s13q15)   # the consolidated graphed run: every baseline at 50% and 25%, the model's own routing as the
            # 'own' columns, Accelerate at 25%, Qwen1.5 (~6 min)
    timeout 570 $B --shape qwen15moe --trace gpu_traces/q60x4_test.fmt --trace-requests 3 \
      --history gpu_traces/q60x4_hist.fmt --history-requests 24 --policies $POL --budgets 50%,25% \
      --repeats 2 --skip-loop --own-routing --accelerate --accelerate-budgets 25% --accelerate-tokens 3 \
      --out "$out/s13_qwen15moe_trace.json" 2>&1 | grep -v "engine ready" | tail -18 ;;
  s13q3)    # the same on Qwen3-30B-A3B without Accelerate (acc3 measures it; ~7 min)
    timeout 570 $B --shape qwen3_30b --trace gpu_traces/q128x8_test.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 12 --policies $POL --budgets 50%,25% \
      --repeats 2 --skip-loop --own-routing --out "$out/s13_qwen3_30b_trace.json" 2>&1 \
      | grep -v "engine ready" | tail -18 ;;
  s13ema|s13ema2|s14ema)  # router-probability eviction against lru and finemoe's decayed LFU, Qwen1.5
            # then Qwen3, 25% (~5 min; records s13_*_ema.json were made at e8d255c, before its host
            # work left the critical path, s13_*_ema2.json at 2524b13, s14_*_ema.json at c9f4515 with
            # the duty's back-off). Carry (56 MB): q60x4_t3.fmt (slim_trace --requests 3 of
            # q60x4_test), q60x4_h16.fmt (16 of q60x4_hist), q128x8_t2.fmt (2 of q128x8_test),
            # q128x8_hist.fmt
    EMA="lru,lru+eviction='router-ema',finemoe,finemoe+eviction='router-ema'"
    case $part in s14*) pre=s14 tag=ema ;; *) pre=s13 tag=${part#s13} ;; esac
    pair "$EMA" "${pre}_qwen15moe_$tag.json" "${pre}_qwen3_30b_$tag.json" ;;
  s15sweep) # session 15: the prefill sweep (cache.py) against each policy's own prefill victims, Qwen1.5 then
            # Qwen3, 25%, after the GPU tests (~8 min); carry as s14ema (56 MB)
    python -m pytest -q tests/gpu 2>&1 | tail -2
    pair "lru,lru+prefill_eviction='sweep',finemoe,finemoe+prefill_eviction='policy'" \
      s15_qwen15moe_sweep.json s15_qwen3_30b_sweep.json ;;
  s15plans) # session 15: finemoe (sweep) with and without its gate's prefill plans beside lru + sweep (~3.5 min)
    pair "lru+prefill_eviction='sweep',finemoe,finemoe+prefill_plans='none'" \
      s15_qwen15moe_sweep_plans.json s15_qwen3_30b_sweep_plans.json ;;
  s16pred)  # session 16: finemoe's prefill predictors once its demand copies are issued (prefill_predict
            # after-demand, its default now) against before them, beside lru + sweep, Qwen1.5 then Qwen3,
            # 25%, after the GPU tests (~7 min); carry as s14ema (56 MB)
    python -m pytest -q tests/gpu 2>&1 | tail -2
    pair "lru+prefill_eviction='sweep',finemoe,finemoe+prefill_predict='before'" \
      s16_qwen15moe_predict.json s16_qwen3_30b_predict.json ;;
  s16prof)  # session 16: where the host time of a Qwen3 prefill goes, lru + sweep against finemoe: one
            # round, then one prefill of each under cProfile (--profile-tokens 1; ~3 min; carry as s16pred)
    timeout 280 $B --shape qwen3_30b --trace gpu_traces/q128x8_t2.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 12 --budgets 25% --repeats 1 --skip-loop \
      --policies "lru+prefill_eviction='sweep',finemoe" --profile "lru+prefill_eviction='sweep',finemoe" \
      --profile-tokens 1 --out "$out/s16_qwen3_30b_prefill_profile.json" 2>&1 | grep -v "engine ready" | tail -6 ;;
  s16serve) # session 16: GPU tests at the session's last engine change, then s14serve's online run again
            # (finemoe's prefill predictors after its demand copies, copies issued in runs); carry
            # gpu_traces/q60x4_t3.fmt and q60x4_h16.fmt (21 MB; ~6 min)
    python -m pytest -q tests/gpu 2>&1 | tail -2
    timeout 250 $B --shape qwen15moe --trace gpu_traces/q60x4_t3.fmt --trace-requests 3 \
      --history gpu_traces/q60x4_h16.fmt --history-requests 16 --policies lru --budgets 25% --repeats 1 \
      --skip-loop --serve-requests 8 --serve-rate 0.6 --serve-policies lru,mixtral-offloading,moe-infinity,finemoe \
      --out "$out/s16_serve_qwen15moe_trace.json" 2>&1 | grep -v "engine ready" | tail -12 ;;
  s16dprof) # session 16: where a Qwen3 decode's host time goes, lru against finemoe (the simulator says
            # 0.90x lru's TPOT, the H200 1.00x): one round, then one whole request of each under
            # cProfile (~2.5 min; carry the two q128x8 files as s16prof)
    timeout 280 $B --shape qwen3_30b --trace gpu_traces/q128x8_t2.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 12 --budgets 25% --repeats 1 --skip-loop \
      --policies lru,finemoe --profile lru,finemoe \
      --out "$out/s16_qwen3_30b_decode_profile.json" 2>&1 | grep -v "engine ready" | tail -6 ;;
  s14mix)   # session 14: Mixtral-8x7B (16 layers) with graphed decode, every baseline at 25%; traces
            # rebuilt in session 13 (carry gpu_traces/m8x2_{test,hist}.fmt, 9 MB; ~6 min)
    mix 560 "$POL,lru+eviction='router-ema'" s14_mixtral16_trace.json 14 ;;
  s14serve) # session 14: the online run with graphed decode, Qwen1.5 25%: Poisson arrivals at 0.6 req/s
            # (utilisation ~0.6 at lru's ~1 s per request), 8 requests cycling the 3 test prompts; carry
            # gpu_traces/q60x4_t3.fmt and q60x4_h16.fmt (21 MB; ~3 min)
    timeout 250 $B --shape qwen15moe --trace gpu_traces/q60x4_t3.fmt --trace-requests 3 \
      --history gpu_traces/q60x4_h16.fmt --history-requests 16 --policies lru --budgets 25% --repeats 1 \
      --skip-loop --serve-requests 8 --serve-rate 0.6 --serve-policies lru,mixtral-offloading,moe-infinity,finemoe \
      --out "$out/s14_serve_qwen15moe_trace.json" 2>&1 | grep -v "engine ready" | tail -12 ;;
  s15acc)   # next session: Accelerate at 50% and 25% side by side with lru and finemoe at the same budgets,
            # Qwen1.5 (issue 7 asks both budgets; only 25% was measured). 1 round, 1 request, 3 Accelerate
            # tokens; carry gpu_traces/q60x4_t3.fmt and q60x4_h16.fmt (~5 min)
    acc 560 qwen15moe q60x4_t3 q60x4_h16 16 3 s15_accelerate_qwen15moe_trace.json ;;
  s15acc3)  # next session: the same on Qwen3-30B-A3B (no Qwen3 Accelerate record exists yet), 2 tokens;
            # carry gpu_traces/q128x8_t2.fmt and q128x8_hist.fmt; ~8 min, check first
    acc 580 qwen3_30b q128x8_t2 q128x8_hist 12 2 s15_accelerate_qwen3_30b_trace.json ;;
  s15acc3b) # fallback if s15acc3 runs out of time: transformers all-GPU and Accelerate only (no engine; its
            # rows then come from s13q3 / s14ema, not the same run), 50% and 25%, 2 tokens
    timeout 580 $B --accelerate-only --shape qwen3_30b --trace gpu_traces/q128x8_t2.fmt \
      --accelerate-requests 1 --accelerate-budgets 50%,25% --accelerate-tokens 2 \
      --out "$out/s15_accelerate_only_qwen3_30b_trace.json" 2>&1 | tail -8 ;;
  s13prof)  # next session: where finemoe's predicting host time goes in graphed steps (cProfile tables
            # next to the record), and the map search in a worker process, Qwen1.5 25% (~5 min)
    timeout 540 $B --shape qwen15moe --trace gpu_traces/q60x4_test.fmt --trace-requests 3 \
      --history gpu_traces/q60x4_hist.fmt --history-requests 24 --budgets 25% --repeats 2 --skip-loop \
      --policies "lru,finemoe,finemoe+prediction_duty='always',finemoe+search='process'" \
      --profile "finemoe+prediction_duty='always'" --out "$out/s13_qwen15moe_prof.json" 2>&1 \
      | grep -v "engine ready" | tail -10 ;;
  s10gate)  # GPU tests, then finemoe's prefill with the gate only (the default) against none, Qwen3 25% (~7 min)
    python -m pytest -q tests/gpu 2>&1 | tail -3
    q3 400 "lru,finemoe,finemoe+prefill_plans='none'" s10_qwen3_30b_trace_gate.json 8 ;;
  overhead) # GPU tests, then the predictor's critical-path overhead on the reference shape: inline,
            # searcher thread and worker process (~6 min)
    python -m pytest -q tests/gpu 2>&1 | tail -4
    timeout 420 python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \
      --rounds 2 --prompts 3 --modes sync,async,process --out "$out/overhead_gpu_reference.json" 2>&1 \
      | grep -v " INFO \|round" | tail -14 ;;
  mixtral1) # the first Mixtral run (session 8): every baseline and the fixed prefetch window, 25%, 1 round (~3 min)
    timeout 560 $B --shape mixtral --layers 16 --trace gpu_traces/m8x2_test.fmt --trace-requests 2 \
      --history gpu_traces/m8x2_hist.fmt --history-requests 12 --budgets 25% --repeats 1 --skip-loop \
      --policies "lru,mixtral-offloading,promoe,moe-infinity,finemoe,finemoe+prefetch_window='fixed'" \
      --out "$out/offload_mixtral16_trace.json" 2>&1 | grep -v "engine ready" | tail -14 ;;
  qwen3b)   # session 7: the link window, candidate pruning and batched victims against the baselines
    q3 560 "lru,mixtral-offloading,promoe,finemoe,finemoe+map_min_precision=0.4,finemoe+trajectory_candidates=0" offload_qwen3_30b_trace_s7.json 14 ;;
  check7)   # GPU tests, then the Qwen3 25% comparison after the stream-lookup change
    python -m pytest -q tests/gpu 2>&1 | tail -3
    q3 420 "lru,mixtral-offloading,promoe,finemoe,finemoe+map_min_precision=0.4" check_qwen3_30b_trace_s7.json 9 ;;
  variants3)  # what finemoe's host time buys: its variants next to the best baselines, Qwen3 25%
    q3 560 "promoe,finemoe,finemoe+map_min_score=0.8,mixtral-offloading+eviction='decay-lfu'" variants_qwen3_30b_trace.json 25 ;;
  diag3)    # where finemoe's decode step goes: variants, late prefetches, predictor ms, cProfile tables
    timeout 580 $B --shape qwen3_30b --trace gpu_traces/q128x8_test.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 12 --budgets 25% --repeats 2 --skip-loop \
      --policies "promoe,finemoe,finemoe+max_inflight_prefetches=1,finemoe+gate_refine=False,finemoe+map_min_score=0.8" \
      --profile finemoe,promoe --out "$out/diag_qwen3_30b_trace.json" 2>&1 | grep -v "engine ready" | tail -25 ;;
  check3)   # GPU tests, then a short Qwen3 25% check of promoe against finemoe (1 round, profiles)
    python -m pytest -q tests/gpu 2>&1 | tail -5
    timeout 330 $B --shape qwen3_30b --trace gpu_traces/q128x8_test.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 8 --budgets 25% --repeats 1 --skip-loop \
      --policies "promoe,finemoe,finemoe+map_min_score=0.8" --profile finemoe \
      --out "$out/check_qwen3_30b_trace.json" 2>&1 | grep -v "engine ready" | tail -9 ;;
  why3)     # where the decode step goes (host predictor ms, device-bound sync ms), 1 round
    timeout 400 $B --shape qwen3_30b --trace gpu_traces/q128x8_test.fmt --trace-requests 2 \
      --history gpu_traces/q128x8_hist.fmt --history-requests 8 --budgets 25% --repeats 1 --skip-loop \
      --policies "lru,promoe,finemoe,finemoe+map_min_score=0.8" \
      --out "$out/why_qwen3_30b_trace.json" 2>&1 | grep -v "engine ready" | tail -9 ;;
  acc15)    # same run: lru, finemoe and Accelerate at 25% on Qwen1.5-MoE (1 round, 1 request; ~4 min)
    timeout 380 $B --shape qwen15moe --trace gpu_traces/q60x4_test.fmt --trace-requests 1 \
      --history gpu_traces/q60x4_hist.fmt --history-requests 24 --policies lru,finemoe --budgets 25% \
      --repeats 1 --skip-loop --accelerate --accelerate-budgets 25% --accelerate-tokens 3 \
      --out "$out/accelerate_qwen15moe_trace.json" 2>&1 | grep -v "engine ready" | tail -12 ;;
  acc3)     # transformers all-GPU + Accelerate 25% on Qwen3-30B-A3B, same requests
    timeout 560 $B --accelerate-only --shape qwen3_30b --trace gpu_traces/q128x8_test.fmt \
      --accelerate-requests 1 --accelerate-budgets 25% --accelerate-tokens 3 \
      --out "$out/accelerate_qwen3_30b_trace.json" 2>&1 | tail -8 ;;
  *) echo "unknown part $part (see the case labels of benchmarks/gpu_campaign.sh, e.g. tests|s13q15|s13q3|s13ema2|s14mix|acc15)"; exit 2 ;;
esac
