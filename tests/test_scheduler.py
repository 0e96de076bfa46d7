"""Continuous batching: requests joining and leaving a running batch get exactly what they get
alone; the KV merge/select mechanism is exact; cancellation frees the slot; predictors track
requests by stable id; incremental text never splits a character or leaks a stop string."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.baselines import RequestMatrixStore, RunningActivations
from finemoe.errors import ConfigError
from finemoe.generation import RunningBatch
from finemoe.history import HistoryRecorder
from finemoe.predictor import PredictorDeps
from finemoe.scheduler import FinishEvent, GenerationRequest, Scheduler, SchedulerBusy, SchedulerClosed, TokenEvent
from finemoe.synthetic import byte_tokenizer
from finemoe.textstream import TextStream
from finemoe.types import IterationContext, MoESpec, RoutingEvent

LENGTHS = [5, 17, 9, 23, 3, 12, 30, 8, 14, 6]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen2_moe", tokenizer=True, vocab_size=260)


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 250, (int(k),), generator=g).tolist() for k in torch.randint(2, 40, (n,), generator=g)]


class Collector:
    """A sink gathering every event; `wait()` blocks until all submitted requests finished."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}
        self.results: dict[int, object] = {}
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def sink(self, event) -> None:
        rid = event.request_id if isinstance(event, TokenEvent) else event.result.request_id
        with self.lock:
            self.events.setdefault(rid, []).append(event)
            if isinstance(event, FinishEvent):
                self.results[rid] = event.result
                self.done.notify_all()

    def wait(self, n: int, timeout: float = 60.0) -> None:
        with self.lock:
            assert self.done.wait_for(lambda: len(self.results) >= n, timeout), "requests did not finish"


@pytest.mark.parametrize("policy", ["finemoe", "moe-infinity", "lru"])
def test_joining_requests_match_solo_greedy(ckpt, policy):
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", policy=policy, device="cpu", progress=False)
    try:
        prompts = _prompts(len(LENGTHS))
        solo = [
            eng.generate(p, SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
            for p, n in zip(prompts, LENGTHS, strict=True)
        ]
        sched = Scheduler(eng, max_batch=8).start()
        col = Collector()
        ids = []
        for i, (p, n) in enumerate(zip(prompts, LENGTHS, strict=True)):
            req = GenerationRequest(tuple(p), SamplingParams(max_new_tokens=n, ignore_eos=True))
            ids.append(sched.submit(req, col.sink))
            if i in (3, 6):
                time.sleep(0.05)  # later requests join a batch that is already decoding
        col.wait(len(ids))
        assert sched.max_rows_seen > 1 and sched.iterations["prefill"] >= 2
        for rid, want in zip(ids, solo, strict=True):
            got = col.results[rid]
            assert list(got.token_ids) == want.token_ids
            assert got.text == want.text
            assert "".join(e.text for e in col.events[rid] if isinstance(e, TokenEvent)) == got.text
            assert got.finish_reason == "length" and got.prompt_tokens == len(want.prompt_token_ids)
        assert max(col.results[r].mean_batch_size for r in ids) > 1
        sched.close()
        assert not eng.serving
        if policy == "moe-infinity":  # the history recorder committed one activation matrix per request
            assert eng.requests.size == 2 * len(prompts)
        elif policy == "finemoe":  # it recorded maps, but no matrices: finemoe reads none, no file saves them
            assert eng.requests.size == 0 and eng.maps.size > 0
    finally:
        eng.close()


def test_seeded_sampling_matches_generate(ckpt):
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", policy="lru", device="cpu", progress=False)
    try:
        params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
        prompt = _prompts(1)[0]
        want = eng.generate(prompt, params)[0].token_ids
        sched = Scheduler(eng).start()
        col = Collector()
        rid = sched.submit(GenerationRequest(tuple(prompt), params), col.sink)
        other = sched.submit(GenerationRequest((1, 2, 3), SamplingParams(max_new_tokens=12, ignore_eos=True)), col.sink)
        col.wait(2)
        assert list(col.results[rid].token_ids) == want
        assert col.results[other].finish_reason == "length"
        sched.close()
    finally:
        eng.close()


def test_merge_and_select_keep_logits(ckpt, reference_model):
    """Prefill two groups, merge, drop a row: every row's next logits equal its solo forward."""
    ref = reference_model(ckpt)
    prompts = _prompts(4)
    nothing = lambda ids, live: None  # noqa: E731
    a, la = RunningBatch.prefill(ref, prompts[:2], 0, torch.device("cpu"), nothing)
    b, lb = RunningBatch.prefill(ref, prompts[2:], 0, torch.device("cpu"), nothing)
    first = torch.cat([la, lb]).argmax(-1).tolist()
    a.merge(b)
    assert a.size == 4 and a.mergeable
    logits = a.decode(ref, first, nothing)  # [4, V]
    a.select([1, 3])
    assert a.width == max(len(prompts[1]), len(prompts[3])) + 1  # leading pad columns trimmed
    nxt = logits.argmax(-1).tolist()
    logits2 = a.decode(ref, [nxt[1], nxt[3]], nothing)
    for row, i in enumerate([1, 3]):
        with torch.no_grad():
            seq = torch.tensor([[*prompts[i], first[i], nxt[i]]])
            want = ref(seq).logits[0, -2:].float()
        torch.testing.assert_close(logits[i], want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits2[row], want[1], atol=1e-4, rtol=1e-4)


def test_cancel_frees_the_slot_and_refcounts(ckpt):
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", device="cpu", progress=False)
    try:
        sched = Scheduler(eng, max_batch=2, max_queue=1).start()
        col = Collector()
        long = SamplingParams(max_new_tokens=400, ignore_eos=True)
        running = sched.submit(GenerationRequest((5, 6, 7), long), col.sink)
        while sched.running < 1:
            time.sleep(0.01)
        second = sched.submit(GenerationRequest((8, 9), long), col.sink)
        while sched.running < 2:
            time.sleep(0.01)
        waiting = sched.submit(GenerationRequest((10,), long), col.sink)
        with pytest.raises(SchedulerBusy):
            sched.submit(GenerationRequest((11,), long), col.sink)
        sched.cancel(waiting)
        sched.cancel(running)
        col.wait(2)
        assert col.results[waiting].finish_reason == "cancelled" and not col.results[waiting].token_ids
        assert col.results[running].finish_reason == "cancelled"
        while sched.running != 1:
            time.sleep(0.01)
        sched.cancel(second)
        col.wait(3)
        while sched.running:
            time.sleep(0.01)
        assert sched.queue_depth == 0
        assert all(r == 0 for r in eng.cache.refcount)
        sched.close()
        with pytest.raises(SchedulerClosed):
            sched.submit(GenerationRequest((1,), long), col.sink)
    finally:
        eng.close()


def test_close_drains_then_cancels(ckpt):
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", policy="lru", device="cpu", progress=False)
    try:
        sched = Scheduler(eng).start()
        col = Collector()
        short = sched.submit(GenerationRequest((1, 2), SamplingParams(max_new_tokens=3, ignore_eos=True)), col.sink)
        endless = sched.submit(GenerationRequest((3,), SamplingParams(max_new_tokens=10**6, ignore_eos=True)), col.sink)
        with pytest.raises(ConfigError):
            eng.generate([1, 2], SamplingParams(max_new_tokens=2))  # the scheduler owns the model
        sched.close(drain_s=2.0)
        assert col.results[short].finish_reason == "length"
        assert col.results[endless].finish_reason == "cancelled"
        assert eng.generate([1, 2], SamplingParams(max_new_tokens=2))[0].token_ids  # usable again
    finally:
        eng.close()


def test_stop_token_and_one_token_requests(ckpt):
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", policy="lru", device="cpu", progress=False)
    try:
        prompt = _prompts(1)[0]
        solo = eng.generate(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
        sched = Scheduler(eng).start()
        col = Collector()
        one = sched.submit(GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=1)), col.sink)
        stop = SamplingParams(max_new_tokens=6, stop_token_ids=(solo[2],))
        stopped = sched.submit(GenerationRequest(tuple(prompt), stop), col.sink)
        col.wait(2)
        assert list(col.results[one].token_ids) == solo[:1] and col.results[one].finish_reason == "length"
        first = solo.index(solo[2])
        assert list(col.results[stopped].token_ids) == solo[: first + 1]
        assert col.results[stopped].finish_reason == "stop"
        sched.close()
    finally:
        eng.close()


# -- request identity in the predictors ------------------------------------------------------------
def _spec() -> MoESpec:
    return MoESpec("x", (0, 1), 4, 2, 8, 8, (), torch.float32, 2)


def _ctx(it: int, prefill: bool, ids: tuple[int, ...] | None, finished=(), per_row=1) -> IterationContext:
    B = len(ids) if ids is not None else 2
    rows = torch.arange(B * per_row)
    return IterationContext(it, prefill, B, rows, rows // per_row, None, request_ids=ids, finished_ids=finished)


def _route(rec, it: int, layer: int, topk: list[list[int]]) -> None:
    t = torch.tensor(topk)
    rec.on_routing(RoutingEvent(it, layer, torch.full((len(topk), 4), 0.25), t, False))


def test_history_commits_each_request_when_it_leaves():
    spec = _spec()
    store = RequestMatrixStore(2, 4)
    rec = HistoryRecorder(PredictorDeps(spec, 1, None, store))
    rec.on_iteration_start(_ctx(0, True, (7,), per_row=1))  # request 7 prefills alone
    _route(rec, 0, 0, [[0, 1]])
    _route(rec, 0, 1, [[2, 3]])
    rec.on_iteration_start(_ctx(1, True, (9,)))  # request 9 joins: 7 must not be committed yet
    _route(rec, 1, 0, [[1, 2]])
    _route(rec, 1, 1, [[0, 3]])
    assert store.size == 0
    rec.on_iteration_start(_ctx(2, False, (7, 9)))  # one decode iteration for both
    _route(rec, 2, 0, [[0, 1], [3, 2]])
    _route(rec, 2, 1, [[2, 3], [0, 1]])
    rec.on_iteration_start(_ctx(3, False, (9,), finished=(7,)))  # 7 left
    assert store.size == 1
    want7 = torch.tensor([[2.0, 2, 0, 0], [0, 0, 2, 2]])
    torch.testing.assert_close(store.mats[0], want7)
    _route(rec, 3, 0, [[0, 1]])
    _route(rec, 3, 1, [[1, 2]])
    rec.end_requests()
    want9 = torch.tensor([[1.0, 2, 2, 1], [2, 2, 1, 1]])
    torch.testing.assert_close(store.mats[1], want9)


def test_history_counts_an_iteration_cut_short_and_stores_no_map_of_it():
    """An iteration cut short (a routing out of order) counts the layers it saw and stores no map."""
    spec = _spec()
    store = RequestMatrixStore(2, 4)
    rec = HistoryRecorder(PredictorDeps(spec, 1, None, store))
    rec.on_iteration_start(_ctx(0, True, (7,)))
    _route(rec, 0, 0, [[0, 1]])
    _route(rec, 0, 0, [[2, 3]])  # layer 0 again: the iteration is dropped from here on
    _route(rec, 0, 1, [[2, 3]])  # (ignored)
    rec.end_requests()
    assert store.size == 1 and store.mats[0].tolist() == [[1.0, 1, 0, 0], [0, 0, 0, 0]]


def test_running_activations_static_batches_unchanged():
    """Without request ids a prefill starts a new batch (the previous one is returned)."""
    run = RunningActivations(2, 4)
    assert run.begin(_ctx(0, True, None)) == []
    run.count(0, torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1]))
    ended = run.begin(_ctx(1, False, None))
    assert ended == [] and run.batch[:, 0].sum() == 4
    ended = run.begin(_ctx(2, True, None))
    assert len(ended) == 2 and float(ended[1][0, 2]) == 1.0
    assert run.batch.sum() == 0


def test_running_activations_count_rows_of_one_and_of_several_requests():
    """`count` adds each selection once into its request's [L, E] row, duplicates included
    (several prefill rows of one request pick the same expert): a hand-computed tally."""
    run = RunningActivations(2, 4)
    run.begin(_ctx(0, True, (3,), per_row=3))  # one request, 3 prompt rows
    run.count(1, torch.tensor([[0, 2], [2, 3], [2, 0]]), torch.tensor([0, 0, 0]))
    assert run.batch[0].tolist() == [[0, 0, 0, 0], [2, 0, 3, 1]]
    run.begin(_ctx(1, True, (3, 5), per_row=2))  # request 5 joins, its two rows after 3's
    run.count(0, torch.tensor([[1, 3], [3, 0], [2, 1], [1, 0]]), torch.tensor([0, 0, 1, 1]))
    assert run.by_id[3].tolist() == [[1, 1, 0, 2], [2, 0, 3, 1]]  # a view of the batch row, counted
    assert run.by_id[5].tolist() == [[1, 2, 1, 0], [0, 0, 0, 0]]
    assert run.pop(5).tolist() == [[1, 2, 1, 0], [0, 0, 0, 0]] and 5 not in run.by_id


# -- text ------------------------------------------------------------------------------------------
def test_textstream_never_splits_characters():
    tok = byte_tokenizer()
    text = "héllo wörld → ✓ 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    pieces = [stream.push([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == text == stream.text


def test_textstream_equals_one_shot_decode_on_random_bytes():
    """Random byte tokens (invalid UTF-8 included): the pieces concatenate to `decode(all)`."""
    tok = byte_tokenizer()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, len(tok), (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        stream = TextStream(tok)
        text = "".join(stream.push([t]) for t in ids) + stream.finish()
        assert text == stream.text == tok.decode(ids, skip_special_tokens=True)


def test_textstream_stop_strings_are_cut_and_never_streamed():
    tok = byte_tokenizer()
    ids = tok("abc STOP def", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=("STOP", "zz"))
    pieces = []
    for t in ids:
        pieces.append(stream.push([t]))
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == "abc " == stream.text
    assert all("S" not in p for p in pieces)
    partial = TextStream(tok, stop=("STOP",))
    out = "".join(partial.push([t]) for t in tok("xST", add_special_tokens=False)["input_ids"])
    assert out == "x" and partial.finish() == "ST" and partial.text == "xST"


def test_sink_queue_sees_tokens_before_finish(ckpt):
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", policy="lru", device="cpu", progress=False)
    try:
        sched = Scheduler(eng).start()
        q: queue.Queue = queue.Queue()
        sched.submit(GenerationRequest((1, 2, 3), SamplingParams(max_new_tokens=4, ignore_eos=True)), q.put)
        kinds = []
        while not kinds or kinds[-1] != "finish":
            kinds.append("finish" if isinstance(q.get(timeout=30), FinishEvent) else "token")
        assert kinds == ["token"] * 4 + ["finish"]
        sched.close()
    finally:
        eng.close()


def test_history_stores_grow_under_the_scheduler_then_generate(ckpt):
    """The request store first grows on the engine thread (inside inference mode); later commits
    from `generate` (outside it) must still work."""
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", policy="moe-infinity", device="cpu", progress=False)
    try:
        sched = Scheduler(eng).start()
        col = Collector()
        for n in (2, 6):  # the short one leaves first: committed at the next iteration's start
            sched.submit(GenerationRequest((4, 5, 6), SamplingParams(max_new_tokens=n, ignore_eos=True)), col.sink)
        col.wait(2)
        sched.close()
        assert eng.requests.size == 2
        eng.generate([7, 8], SamplingParams(max_new_tokens=3))
        assert eng.requests.size == 3
    finally:
        eng.close()


def test_prefill_groups_bound_padding(ckpt):
    eng = Engine.from_pretrained(ckpt, expert_budget="40%", policy="lru", device="cpu", progress=False)
    try:
        sched = Scheduler(eng, max_prefill_tokens=100, pad_slack=1.25)
        seqs = [
            type("S", (), {"request": GenerationRequest(tuple(range(n)), SamplingParams())})()
            for n in (50, 10, 11, 30, 12, 60, 40, 9)
        ]
        groups = [[len(s.request.prompt_ids) for s in g] for g in sched._groups(seqs)]
        assert sorted(n for g in groups for n in g) == [9, 10, 11, 12, 30, 40, 50, 60]
        for g in groups:
            assert max(g) * len(g) <= max(1.25 * sum(g), max(g)) and (len(g) == 1 or max(g) * len(g) <= 100)
        assert groups[0] == [9, 10, 11, 12] and len(groups) < 8
    finally:
        eng.close()


def test_requests_missing_from_a_decode_iteration_are_committed():
    """A dropped context (async searcher behind) must not leak a finished request's matrix."""
    run = RunningActivations(2, 4)
    run.begin(_ctx(0, True, (1, 2)))
    run.count(0, torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1]))
    assert run.begin(_ctx(1, True, (3,))) == []  # a prefill holds only newcomers: nobody left
    ended = run.begin(_ctx(2, False, (1, 3)))  # request 2 is gone; the context naming it was lost
    assert len(ended) == 1 and ended[0][0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert set(run.by_id) == {1, 3}


def test_sliding_window_models_fall_back_to_static_batches(tiny_checkpoint):
    eng = Engine.from_pretrained(tiny_checkpoint("gpt_oss"), expert_budget="40%", device="cpu", progress=False)
    try:
        prompts = _prompts(4)
        solo = [eng.generate(p, SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids for p in prompts]
        sched = Scheduler(eng).start()
        assert not sched.continuous
        col = Collector()
        ids = []
        for i, p in enumerate(prompts):
            ids.append(
                sched.submit(GenerationRequest(tuple(p), SamplingParams(max_new_tokens=6, ignore_eos=True)), col.sink)
            )
            if i == 1:
                time.sleep(0.05)
        col.wait(4)
        assert [list(col.results[r].token_ids) for r in ids] == solo
        sched.close()
    finally:
        eng.close()
