"""The device's record of a graphed step's expert map (`step_record.StepRecord`): the routers'
probabilities read from their static logits, read at once (`take`) or later (`later`, a reader the
map store calls at the next step's insert), and a reader that outlived its step refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finemoe.models.base import softmax_probs
from finemoe.step_record import StepRecord


@pytest.fixture(autouse=True)
def _current_stream_kept():
    """The record's launch leaves the mark's stream current (as the replay wants): restored after each
    test, so later tests see the default stream as the caller's."""
    before = torch.cuda.current_stream()
    yield
    torch.cuda.set_stream(before)


def _record(L: int = 3, T: int = 1, E: int = 8) -> tuple[StepRecord, list[torch.Tensor], torch.cuda.Stream]:
    dev = torch.device("cuda")
    logits = [torch.zeros(T, E, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    routed = [(nn.Identity(), (x,), (x,)) for x in logits]  # (router, its inputs, its outputs: logits at 0)
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream())  # (the logits' zeros are written on the current stream)
    rec = StepRecord(dev)
    with torch.cuda.stream(stream):
        assert rec.capture(routed, 0, softmax_probs, stream), rec.error
    return rec, logits, stream


def _want(logits: list[torch.Tensor]) -> torch.Tensor:
    """[T, L, E] float32 on the host."""
    return torch.stack([x.float().softmax(-1) for x in logits], dim=1).cpu()


def test_a_step_map_read_now_or_at_the_next_step_is_the_steps_own():
    rec, logits, stream = _record()
    gen = torch.Generator(device="cuda").manual_seed(3)
    readers = []
    for step in range(4):
        rec.before_step(stream)
        with torch.cuda.stream(stream):
            for x in logits:  # the step's routers write their static outputs
                x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        stream.synchronize()  # (the expectation is computed on another stream)
        want = _want(logits)
        rec.mark(stream)
        if step % 2:
            got = rec.take()
        else:
            reader = rec.later()
            readers.append(reader)
            with torch.cuda.stream(stream):  # the next step's first segment rewrites a router's logits
                rec.before_step(stream)  # (it waits for the record on the GPU)
                logits[0].fill_(7.0)
            got = reader()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # a reader of an earlier step, called after a later record was launched, is refused
    with pytest.raises(RuntimeError, match="after the next step's record"):
        readers[0]()
    with pytest.raises(RuntimeError, match="before its last router"):
        rec.later()  # (no mark in this step)


def test_a_reader_outlives_a_recapture_of_the_record():
    """The graphs recaptured (a longer static cache drops them, `StaticDecoder.reserve`) between a
    step's end and the insert that reads its map: the reader reads the step's own buffer."""
    rec, logits, stream = _record()
    rec.before_step(stream)
    with torch.cuda.stream(stream):
        for i, x in enumerate(logits):
            x.copy_(torch.arange(x.numel(), device="cuda", dtype=torch.float32).view_as(x) * (i + 1) / 10)
    stream.synchronize()  # (the expectation is computed on another stream)
    want = _want(logits)
    rec.mark(stream)
    reader = rec.later()
    rec.drop()  # (waits for the record in flight)
    routed = [(nn.Identity(), (x,), (x,)) for x in logits]
    with torch.cuda.stream(stream):
        assert rec.capture(routed, 0, softmax_probs, stream)
        for x in logits:
            x.fill_(-3.0)
    rec.before_step(stream)
    rec.mark(stream)
    rec.take()  # the new graph's first record, into its own buffer
    torch.testing.assert_close(reader(), want, rtol=1e-6, atol=1e-6)
