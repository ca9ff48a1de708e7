"""app.batching.MicroBatcher: order, batch limits, deadlines, overload, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from app.batching import MicroBatcher
from app.errors import ApiError
from app.metrics import Metrics


class Recorder:
    """A predict function that records its batches and can be held (to build up a queue)."""

    def __init__(self, fn: Callable[[object], object] = lambda v: ("out", v)) -> None:
        self.fn = fn
        self.batches: list[list[object]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, values: list[object]) -> list[object]:
        self.entered.set()
        self.release.wait(timeout=10)
        self.batches.append(list(values))
        return [self.fn(v) for v in values]


def make(predict: Callable[[list[Any]], Sequence[Any]], **kw: object) -> MicroBatcher[Any, Any]:
    options: dict[str, object] = {"max_batch_size": 4, "max_delay_s": 0.01, "max_queue": 64}
    options.update(kw)
    batcher: MicroBatcher[Any, Any] = MicroBatcher("m", predict, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


def far() -> float:
    return asyncio.get_running_loop().time() + 30


async def wait_entered(recorder: Recorder) -> None:
    await asyncio.to_thread(recorder.entered.wait, 10)


async def test_results_keep_order_across_mixed_request_sizes() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=3, max_delay_s=0.02)
    try:
        requests = [[f"r{r}i{i}" for i in range(n)] for r, n in enumerate([1, 5, 2, 8, 3])]
        answers = await asyncio.gather(*(batcher.submit(req, far()) for req in requests))
    finally:
        await batcher.stop()
    for request, answer in zip(requests, answers, strict=True):
        assert answer == [("out", v) for v in request]
    assert all(1 <= len(b) <= 3 for b in rec.batches)
    assert sorted(str(v) for b in rec.batches for v in b) == sorted(v for r in requests for v in r)
    # an 8-image request cannot fit one batch of 3: its items spanned batches
    assert len(rec.batches) >= 7


async def test_batch_closes_when_full_without_waiting_for_the_delay() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=4, max_delay_s=60.0)  # the delay would never end the test
    try:
        answer = await asyncio.wait_for(batcher.submit(list(range(4)), far()), timeout=20)
    finally:
        await batcher.stop()
    assert answer == [("out", i) for i in range(4)]
    assert rec.batches == [[0, 1, 2, 3]]


async def test_batch_closes_after_the_delay_when_not_full() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=8, max_delay_s=0.02)
    try:
        assert await asyncio.wait_for(batcher.submit(["a"], far()), timeout=20) == [("out", "a")]
    finally:
        await batcher.stop()
    assert rec.batches == [["a"]]


async def test_requests_arriving_together_share_a_batch() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = make(rec, max_batch_size=8, max_delay_s=0.01)
    try:
        first = asyncio.ensure_future(batcher.submit(["hold"], far()))
        await wait_entered(rec)  # the first batch is in the model thread; the next ones queue up
        others = [asyncio.ensure_future(batcher.submit([f"x{i}"], far())) for i in range(5)]
        await asyncio.sleep(0)
        rec.release.set()
        await asyncio.gather(first, *others)
    finally:
        await batcher.stop()
    assert rec.batches == [["hold"], [f"x{i}" for i in range(5)]]


async def test_batched_forward_equals_one_by_one() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)).eval()

    def predict(values: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = net(torch.stack(values))  # B x [3, H, W] -> [B, 4, 1, 1]
        return list(out.flatten(1))

    images = [torch.randn(3, 16, 16) for _ in range(7)]
    batcher = make(predict, max_batch_size=4, max_delay_s=0.01)
    try:
        batched = await batcher.submit(images, far())
        singles = [(await batcher.submit([img], far()))[0] for img in images]
    finally:
        await batcher.stop()
    for a, b in zip(batched, singles, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


async def test_expired_items_are_dropped_before_inference() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = make(rec, max_batch_size=1, max_delay_s=0.0)
    try:
        first = asyncio.ensure_future(batcher.submit(["hold"], far()))
        await wait_entered(rec)
        loop = asyncio.get_running_loop()
        late = asyncio.ensure_future(batcher.submit(["late"], loop.time() + 0.05))
        with pytest.raises(ApiError) as err:
            await late
        assert err.value.status_code == 504 and err.value.code == "DEADLINE_EXCEEDED"
        rec.release.set()
        assert await first == [("out", "hold")]
        assert await batcher.submit(["after"], far()) == [("out", "after")]
    finally:
        await batcher.stop()
    assert ["late"] not in rec.batches
    assert rec.batches == [["hold"], ["after"]]


async def test_item_already_expired_in_the_queue_is_refused_by_the_worker() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = make(rec, max_batch_size=1, max_delay_s=0.0)
    try:
        first = asyncio.ensure_future(batcher.submit(["hold"], far()))
        await wait_entered(rec)
        past = asyncio.get_running_loop().time() - 1  # already expired when queued
        queued = asyncio.ensure_future(batcher.submit(["expired"], past))
        with pytest.raises(ApiError) as err:
            await queued
        assert err.value.code == "DEADLINE_EXCEEDED"
        rec.release.set()
        await first
    finally:
        await batcher.stop()
    assert rec.batches == [["hold"]]


async def test_full_queue_answers_overloaded_with_retry_after() -> None:
    rec = Recorder()
    rec.release.clear()
    metrics = Metrics()
    batcher = make(rec, max_batch_size=1, max_delay_s=0.0, max_queue=3, metrics=metrics)
    try:
        first = asyncio.ensure_future(batcher.submit(["hold"], far()))
        await wait_entered(rec)  # "hold" left the queue; 3 places are free
        queued = asyncio.ensure_future(batcher.submit(["a", "b", "c"], far()))
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as err:
            batcher.reserve(1)
        assert err.value.status_code == 503 and err.value.code == "OVERLOADED"
        assert err.value.headers["Retry-After"].isdigit()
        with pytest.raises(ApiError):
            await batcher.submit(["d"], far())
        rec.release.set()
        assert await first == [("out", "hold")]
        assert await queued == [("out", v) for v in "abc"]
        # room again once the queue drained
        assert await batcher.submit(["e"], far()) == [("out", "e")]
    finally:
        await batcher.stop()
    # refusals are counted once per request, by the service's middleware, not per image here
    assert "vision_rejects_total{" not in metrics.render().decode()


def per_image(seconds: float) -> Recorder:
    """A predict that takes ``seconds`` per image (as a CPU does)."""

    def slow(value: object) -> object:
        time.sleep(seconds)
        return ("out", value)

    return Recorder(slow)


async def timed_batcher(per_image_s: float, **kw: object) -> tuple[Recorder, MicroBatcher[Any, Any]]:
    """A batcher whose predict takes ``per_image_s`` per image, after enough full batches (of 2) to
    estimate it."""
    rec = per_image(per_image_s)
    batcher = make(rec, max_batch_size=2, max_delay_s=0.0, **kw)
    for i in range(4):
        await batcher.submit([f"t{i}", f"u{i}"], far())
    return rec, batcher


class PerBatch(Recorder):
    """A predict that takes ``seconds`` per batch whatever its size (as a GPU's small batches do)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, values: list[object]) -> list[object]:
        time.sleep(self.seconds)
        return super().__call__(values)


async def test_a_request_the_queue_would_make_late_gets_overloaded_at_once() -> None:
    rec, batcher = await timed_batcher(0.05)
    try:
        expected = batcher.expected_seconds(1)
        assert expected is not None and expected >= 0.05
        rec.entered.clear()
        rec.release.clear()
        held = asyncio.ensure_future(batcher.submit(["hold", "hold2"], far()))
        await wait_entered(rec)
        queued = asyncio.ensure_future(batcher.submit([f"q{i}" for i in range(20)], far()))
        await asyncio.sleep(0)  # 20 images (about 1 s) wait ahead of the next request
        loop = asyncio.get_running_loop()
        with pytest.raises(ApiError) as err:
            batcher.reserve(1, loop.time() + 0.5)  # alone in time (0.05 s), behind them late
        assert err.value.status_code == 503 and err.value.code == "OVERLOADED"
        assert "deadline" in err.value.message
        assert 1 <= int(err.value.headers["Retry-After"]) <= 60
        with batcher.reserve(1, loop.time() + 30):  # time enough for the queue: admitted
            pass
        with batcher.reserve(1):  # no deadline given: only the queue limit counts
            pass
        with batcher.reserve(20, loop.time() + 0.5):  # too late even alone: admitted, 504 later
            pass
        rec.release.set()
        await held
        assert len(await queued) == 20
    finally:
        rec.release.set()
        await batcher.stop()


async def test_the_rest_of_the_running_batch_counts_toward_the_wait() -> None:
    rec, batcher = await timed_batcher(0.1)  # batches of 2 images, 0.2 s each
    try:
        rec.entered.clear()
        rec.release.clear()
        held = asyncio.ensure_future(batcher.submit(["hold", "hold2"], far()))
        await wait_entered(rec)  # the queue is empty; about 0.2 s of this batch are still to run
        loop = asyncio.get_running_loop()
        with pytest.raises(ApiError) as err:
            batcher.reserve(1, loop.time() + 0.22)  # alone 0.1 s, behind the running batch 0.3 s
        assert err.value.code == "OVERLOADED"
        with batcher.reserve(1, loop.time() + 1.0):
            pass
        rec.release.set()
        await held
    finally:
        rec.release.set()
        await batcher.stop()


async def test_an_image_whose_batch_would_end_past_its_deadline_is_not_run() -> None:
    rec = per_image(0.2)
    batcher = make(rec, max_batch_size=1, max_delay_s=0.0)
    try:
        for i in range(3):
            await batcher.submit([f"t{i}"], far())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.1  # its batch takes 0.2 s: the answer could never be in time
        with pytest.raises(ApiError) as err:
            await batcher.submit(["late"], deadline)
        assert err.value.code == "DEADLINE_EXCEEDED"
        assert loop.time() < deadline  # refused when its batch was formed, not at the deadline
        assert await batcher.submit(["in time"], loop.time() + 1.0) == [("out", "in time")]
    finally:
        await batcher.stop()
    assert ["late"] not in rec.batches


async def test_no_deadline_refusal_on_an_empty_queue_or_before_batches_were_timed() -> None:
    _, batcher = await timed_batcher(0.05)
    try:
        loop = asyncio.get_running_loop()
        with batcher.reserve(4, loop.time() + 0.3):  # nothing waits: the request takes its chance
            pass
    finally:
        await batcher.stop()
    fresh = make(Recorder(), max_batch_size=1, max_delay_s=0.0)
    try:
        assert fresh.expected_seconds(1) is None
        with fresh.reserve(3), fresh.reserve(1, asyncio.get_running_loop().time() + 0.001):
            pass
    finally:
        await fresh.stop()


async def test_a_queue_of_fast_batches_is_not_judged_image_by_image() -> None:
    # timed on batches of one image, 0.05 s each; the 15 images waiting fill two batches of 8
    rec = PerBatch(0.05)
    batcher = make(rec, max_batch_size=8, max_delay_s=0.0)
    try:
        for i in range(3):
            await batcher.submit([f"t{i}"], far())
        assert batcher.expected_seconds(15) == pytest.approx(2 * batcher.expected_seconds(1), rel=1e-6)
        rec.entered.clear()
        rec.release.clear()
        held = asyncio.ensure_future(batcher.submit(["hold"], far()))
        await wait_entered(rec)
        queued = asyncio.ensure_future(batcher.submit([f"q{i}" for i in range(14)], far()))
        await asyncio.sleep(0)
        # 15 x 0.05 s = 0.75 s image by image, but 2 batches x 0.05 s = 0.1 s: in time for 0.4 s
        with batcher.reserve(1, asyncio.get_running_loop().time() + 0.4):
            pass
        rec.release.set()
        await held
        assert len(await queued) == 14
    finally:
        rec.release.set()
        await batcher.stop()


async def test_after_nearly_full_batches_the_wait_is_judged_image_by_image() -> None:
    # batches of 3 of 4 images, each image 0.02 s (a CPU): a full batch of 4 takes 0.08 s, not 0.06 s
    batcher = make(per_image(0.02), max_batch_size=4, max_delay_s=0.0)
    try:
        for i in range(3):
            await batcher.submit([f"a{i}", f"b{i}", f"c{i}"], far())
        full = batcher.expected_seconds(4)
        assert full is not None and full >= 4 * 0.02  # a full batch: 4 images' time, not 3 images'
        assert batcher.expected_seconds(12) == pytest.approx(3 * full, rel=1e-6)
    finally:
        await batcher.stop()


async def test_ticket_reserves_room_until_released() -> None:
    batcher = make(Recorder(), max_queue=4)
    try:
        with batcher.reserve(3) as ticket:
            with pytest.raises(ApiError):
                batcher.reserve(2)
            assert await batcher.submit(["x", "y"], far(), ticket) == [("out", "x"), ("out", "y")]
        # the unused place and the answered ones are free again
        with batcher.reserve(4):
            pass
    finally:
        await batcher.stop()


async def test_exception_in_predict_fails_only_that_batch_and_the_worker_survives() -> None:
    def fn(value: object) -> object:
        if value == "boom":
            raise RuntimeError("model exploded")
        return ("out", value)

    rec = Recorder(fn)
    batcher = make(rec, max_batch_size=8, max_delay_s=0.02)
    try:
        answers: list[object] = await asyncio.gather(
            batcher.submit(["ok1", "boom"], far()), batcher.submit(["ok2"], far()), return_exceptions=True
        )
        bad, neighbour = answers
        assert isinstance(bad, ApiError) and bad.status_code == 500 and bad.code == "INTERNAL"
        assert "exploded" not in bad.message  # no internals in the answer
        assert isinstance(neighbour, ApiError) and neighbour.code == "INTERNAL"  # same batch
        assert await batcher.submit(["later"], far()) == [("out", "later")]
    finally:
        await batcher.stop()


async def test_wrong_number_of_outputs_fails_the_batch() -> None:
    calls = []

    def predict(values: list[object]) -> list[object]:
        calls.append(values)
        return values[:-1] if len(calls) == 1 else values

    batcher = make(predict, max_batch_size=4)
    try:
        with pytest.raises(ApiError) as err:
            await batcher.submit(["a", "b"], far())
        assert err.value.code == "INTERNAL"
        assert await batcher.submit(["c"], far()) == ["c"]
    finally:
        await batcher.stop()


async def test_cancelled_request_items_are_skipped() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = make(rec, max_batch_size=1, max_delay_s=0.0)
    try:
        first = asyncio.ensure_future(batcher.submit(["hold"], far()))
        await wait_entered(rec)
        gone = asyncio.ensure_future(batcher.submit(["gone1", "gone2"], far()))
        await asyncio.sleep(0)
        gone.cancel()
        kept = asyncio.ensure_future(batcher.submit(["kept"], far()))
        await asyncio.sleep(0)
        rec.release.set()
        assert await kept == [("out", "kept")]
        await first
    finally:
        await batcher.stop()
    assert rec.batches == [["hold"], ["kept"]]


async def test_stop_fails_queued_items_with_draining() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = make(rec, max_batch_size=1, max_delay_s=0.0)
    first = asyncio.ensure_future(batcher.submit(["hold"], far()))
    await wait_entered(rec)
    queued = asyncio.ensure_future(batcher.submit(["q"], far()))
    await asyncio.sleep(0)
    await batcher.stop()
    rec.release.set()
    for task in (first, queued):
        with pytest.raises(ApiError) as err:
            await task
        assert err.value.status_code == 503 and err.value.code == "DRAINING"
    with pytest.raises(ApiError) as err:
        await batcher.submit(["x"], far())
    assert err.value.code == "DRAINING"


async def test_metrics_count_batches_and_waits() -> None:
    metrics = Metrics()
    batcher = make(Recorder(), max_batch_size=2, max_delay_s=0.0, metrics=metrics)
    try:
        await batcher.submit(["a", "b", "c"], far())
    finally:
        await batcher.stop()
    text = metrics.render().decode()
    assert 'vision_batch_size_sum{model="m"} 3.0' in text
    assert 'vision_queue_wait_seconds_count{model="m"} 3.0' in text
    assert 'vision_queue_depth_images{model="m"} 0.0' in text
    assert 'vision_inference_seconds_count{model="m"}' in text
