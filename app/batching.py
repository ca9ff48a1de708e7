"""Per-model micro-batching: many requests' images share one forward pass.

One :class:`MicroBatcher` per served model (LitServe's seam: decode -> batch -> predict -> unbatch):

- Admission is counted in images: :meth:`MicroBatcher.reserve` refuses with 503 OVERLOADED when the
  images already waiting (reserved for decoding or queued) plus the new ones exceed ``max_queue``, so
  the wait is bounded before any decoding work starts. Given the request's deadline, it also refuses
  a request that could be answered in time on its own but not behind the images already waiting, at
  the pace of the last batches: on a slow model a full queue can hold more work than a deadline
  allows, and 503 + Retry-After now is better for the client than 504 after the deadline. The wait
  is the rest of the running batch, then the images waiting and the request's own, in full batches
  (its answer comes when its batch ends). A batch's time is its images x seconds per image when
  the timed batches were at least half full, which holds for any hardware then; after smaller
  batches it is the smaller of that and the seconds per batch, since a CPU's batch takes time in
  proportion to its images but a GPU's about the same time whatever its size. A request is
  admitted only if that wait leaves a tenth of its time to spare, as the pace varies from batch to
  batch; under sustained overload this costs no throughput, it only shortens the queue.
- A batch closes when it holds ``max_batch_size`` images or ``max_delay_s`` after its first image
  arrived, whichever comes first. A request's images are separate items, so a request with more
  images than a batch holds spans several batches; its answer waits for all of them.
- Items whose deadline passed, or will pass before their batch can end at the recent pace, are
  dropped before inference (504 DEADLINE_EXCEEDED) instead of taking a slot whose answer would be
  thrown away; items whose request went away (cancelled) are skipped.
- ``predict`` runs in ONE dedicated thread per model, off the event loop; while it runs, the event loop
  keeps decoding and queueing the next requests' images, so the next batch is ready when it returns.
- The outputs are checked (one per input) and mapped back in order. An exception in ``predict``
  fails that batch's requests with 500 INTERNAL (logged with its traceback); the worker goes on.
  ``predict`` may answer an :class:`ItemFailure` in one image's place (a JPEG the device could not
  decode): that image's request gets its error, the rest of the batch its outputs.
- Out of memory (``torch.OutOfMemoryError``, or a RuntimeError whose message says the allocator
  ran out): the batch is split in halves and each half retried, down to single images; an image
  that still runs out of memory alone fails with 503 OVERLOADED (Retry-After), the others of its
  batch are answered. The CUDA cache is emptied before each retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

import torch

from app.errors import ApiError, deadline_exceeded, draining, internal, overloaded, too_much_waiting
from app.metrics import Metrics

log = logging.getLogger(__name__)

InT = TypeVar("InT")
OutT = TypeVar("OutT")
R = TypeVar("R")

#: Batches timed before the wait estimate is trusted, and the weight of the newest one in it.
_ESTIMATE_AFTER_BATCHES = 3
_ESTIMATE_WEIGHT = 0.3
# A request is admitted behind a queue only if the expected wait is at most this share of its time.
_ADMIT_FRACTION = 0.9
# An image is dropped (504) before its batch only if its deadline comes before even a batch this
# much faster than the recent pace would end: the estimate may overstate, the drop must be sure.
_LATE_FRACTION = 0.8


@dataclass(eq=False)
class _Item(Generic[InT, OutT]):
    value: InT
    deadline: float  # event-loop clock (loop.time())
    enqueued: float  # event-loop clock
    future: asyncio.Future[OutT] = field(repr=False)


class Ticket:
    """Room for ``count`` images in a batcher's queue, taken by :meth:`MicroBatcher.reserve`.

    Use it as a context manager: whatever was not submitted is given back on exit.
    """

    def __init__(self, give_back: Callable[[int], None], count: int) -> None:
        self._give_back = give_back
        self.unsubmitted = count

    def release(self) -> None:
        self._give_back(self.unsubmitted)
        self.unsubmitted = 0

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class MicroBatcher(Generic[InT, OutT]):
    """Collects single images into batches for ``predict`` (see the module docstring).

    ``predict(values) -> outputs`` must return one output (or :class:`ItemFailure`) per value, in
    order; it is only ever called from the batcher's own thread.
    """

    def __init__(
        self,
        name: str,
        predict: Callable[[list[InT]], Sequence[OutT | ItemFailure]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_delay_s >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._predict = predict
        self._metrics = metrics
        self._items: deque[_Item[InT, OutT]] = deque()
        self._waiting = 0  # images reserved (decoding) or queued; <= max_queue
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._running: list[_Item[InT, OutT]] = []  # the batch in the inference thread now
        self._running_since = 0.0  # event-loop clock
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._seconds_per_image = 0.0  # moving averages over the timed batches
        self._seconds_per_batch = 0.0
        self._images_per_batch = 0.0
        self._timed_batches = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; queued images fail with 503 DRAINING; the thread is shut down."""
        self._closed = True
        running = self._running  # the worker clears it when cancelled
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in [*running, *self._items]:
            if not item.future.done():
                item.future.set_exception(draining())
        self._items.clear()
        self._running = []
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_in_thread(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` in the model's inference thread (warm-up uses it: same thread as predict)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- requests -------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Images waiting in the queue now (not counting reserved ones still decoding)."""
        return len(self._items)

    def expected_seconds(self, images: int) -> float | None:
        """Seconds until ``images`` more images are answered at the last batches' pace, in whole
        batches: the last image's answer waits for the end of its batch, which under load is full
        (None until a few batches were timed)."""
        full = self._batch_seconds(self.max_batch_size)
        return None if full is None else -(-images // self.max_batch_size) * full

    def _batch_seconds(self, size: int) -> float | None:
        """One batch of ``size`` images: size x seconds per image, or after batches under half full
        the smaller of that and the seconds per batch (see the module docstring); None until a few
        batches were timed."""
        if self._timed_batches < _ESTIMATE_AFTER_BATCHES:
            return None
        by_image = size * self._seconds_per_image
        if 2 * self._images_per_batch >= self.max_batch_size:
            return by_image
        return min(by_image, self._seconds_per_batch)

    def set_pace(self, seconds: float, size: int) -> None:
        """Start the wait estimate from a batch of ``size`` images timed outside the queue (the
        warm-up's), so the first requests after a start are judged too; real batches then refine it."""
        self._seconds_per_image, self._seconds_per_batch = seconds / size, seconds
        self._images_per_batch = float(size)
        self._timed_batches = max(self._timed_batches, _ESTIMATE_AFTER_BATCHES)

    def reserve(self, count: int, deadline: float | None = None) -> Ticket:
        """Room for ``count`` images; raises 503 OVERLOADED (or DRAINING) when there is none.

        With ``deadline`` (event-loop clock), also 503 OVERLOADED when the images already waiting and
        the rest of the running batch would take the request past it although the request alone
        would be in time.
        """
        if self._closed:
            raise draining()
        if self._waiting + count > self.max_queue:
            raise overloaded(self.name)
        if deadline is not None and (self._waiting or self._running):
            now = asyncio.get_running_loop().time()
            alone, behind = self.expected_seconds(count), self.expected_seconds(self._waiting + count)
            if behind is not None:
                behind += self._running_left(now)
            remaining = deadline - now
            if alone is not None and behind is not None and alone <= remaining < behind / _ADMIT_FRACTION:
                raise too_much_waiting(self.name, behind / _ADMIT_FRACTION - remaining)
        self._waiting += count
        return Ticket(self._give_back, count)

    def _running_left(self, now: float) -> float:
        """Expected seconds until the batch in the inference thread ends (0 when none runs)."""
        expected = self._batch_seconds(len(self._running)) if self._running else None
        return 0.0 if expected is None else max(0.0, expected - (now - self._running_since))

    def _give_back(self, count: int) -> None:
        self._waiting -= count

    async def submit(
        self, values: Sequence[InT], deadline: float, ticket: Ticket | None = None
    ) -> list[OutT]:
        """Queue ``values`` (one image each) and wait for their outputs, in order.

        ``deadline`` is on the event-loop clock (``loop.time()``). Without a ticket, room is reserved
        here (503 OVERLOADED when full). Raises ApiError 504 past the deadline, 500 on a failed batch.
        """
        loop = asyncio.get_running_loop()
        if ticket is None:
            with self.reserve(len(values)) as own:
                return await self.submit(values, deadline, own)
        if len(values) > ticket.unsubmitted:
            raise ValueError(f"ticket has room for {ticket.unsubmitted} images, not {len(values)}")
        if self._closed:
            raise draining()
        ticket.unsubmitted -= len(values)  # now counted as queued; the worker releases them
        now = loop.time()
        futures: list[asyncio.Future[OutT]] = []
        for value in values:
            future: asyncio.Future[OutT] = loop.create_future()
            self._items.append(_Item(value, deadline, now, future))
            futures.append(future)
        self._update_depth()
        self._wakeup.set()
        try:
            async with asyncio.timeout_at(deadline):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise deadline_exceeded() from None
        finally:
            for future in futures:  # the others of a failed request need no forward pass
                future.cancel()

    # -- worker ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                self._running = batch
                self._running_since = asyncio.get_running_loop().time()
                try:
                    await self._process(batch)
                except Exception:  # a bug here must not kill the worker
                    log.exception("model %s: batch handling failed", self.name)
                    self._fail(batch)
                finally:
                    self._running = []

    async def _collect(self) -> list[_Item[InT, OutT]]:
        """Wait for a first image, then until the batch is full or ``max_delay_s`` after it arrived."""
        loop = asyncio.get_running_loop()
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        close_at = self._items[0].enqueued + self.max_delay_s
        while len(self._items) < self.max_batch_size:
            remaining = close_at - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        now = loop.time()
        # an image whose deadline comes before this batch can end would only be thrown away
        expected = self._batch_seconds(min(len(self._items), self.max_batch_size)) or 0.0
        late_before = now + _LATE_FRACTION * expected
        batch: list[_Item[InT, OutT]] = []
        while self._items and len(batch) < self.max_batch_size:
            item = self._items.popleft()
            self._waiting -= 1
            if item.future.done():  # its request is gone (cancelled, or failed elsewhere)
                continue
            if item.deadline <= late_before:
                item.future.set_exception(deadline_exceeded())
                continue
            batch.append(item)
            if self._metrics is not None:
                self._metrics.queue_wait_seconds.labels(self.name).observe(now - item.enqueued)
        self._update_depth()
        return batch

    async def _process(self, batch: list[_Item[InT, OutT]]) -> None:
        values = [item.value for item in batch]
        start = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._predict_splitting, values
            )
        except _OutputCountError as exc:
            log.error("model %s: %s", self.name, exc)
            self._fail(batch)
            return
        except Exception as exc:
            log.error("model %s: predict failed on a batch of %d", self.name, len(batch), exc_info=exc)
            self._fail(batch)
            return
        elapsed = time.perf_counter() - start
        self._time_batch(elapsed, len(batch))
        if self._metrics is not None:
            self._metrics.inference_seconds.labels(self.name).observe(elapsed)
            self._metrics.batch_size.labels(self.name).observe(len(batch))
        for item, output in zip(batch, outputs, strict=True):
            if item.future.done():
                continue
            if isinstance(output, ItemFailure):
                item.future.set_exception(output.error)
            else:
                item.future.set_result(output)

    def _time_batch(self, elapsed: float, size: int) -> None:
        weight = 1.0 if self._timed_batches == 0 else _ESTIMATE_WEIGHT
        self._seconds_per_image += weight * (elapsed / size - self._seconds_per_image)
        self._seconds_per_batch += weight * (elapsed - self._seconds_per_batch)
        self._images_per_batch += weight * (size - self._images_per_batch)
        self._timed_batches += 1

    def _predict_splitting(self, values: list[InT]) -> list[OutT | ItemFailure]:
        """``predict(values)``, halving the batch on out-of-memory down to single images; an image
        that alone runs out of memory gets an :class:`_OutOfMemory`. Runs in the inference thread."""
        try:
            outputs = self._predict(values)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            del exc  # its traceback holds the failed forward's tensors
            release_cached_memory()
            if len(values) == 1:
                log.warning("model %s: out of memory on a single image; answering 503", self.name)
                return [_OutOfMemory(self.name)]
            half = len(values) // 2
            log.warning(
                "model %s: out of memory on a batch of %d; retrying as %d + %d",
                self.name,
                len(values),
                half,
                len(values) - half,
            )
            return [*self._predict_splitting(values[:half]), *self._predict_splitting(values[half:])]
        if len(outputs) != len(values):
            raise _OutputCountError(f"predict returned {len(outputs)} outputs for {len(values)} inputs")
        return list(outputs)

    def _fail(self, batch: list[_Item[InT, OutT]]) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(internal())

    def _update_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(self.name).set(len(self._items))


class _OutputCountError(RuntimeError):
    """``predict`` broke its contract: not one output per input."""


class ItemFailure:
    """An output that fails its one image (``predict`` may return it in an image's place, e.g. for a
    file that cannot be decoded); the others of the batch are answered."""

    def __init__(self, error: ApiError) -> None:
        self.error = error


class _OutOfMemory(ItemFailure):
    """The output of an image that ran out of memory even alone: 503 OVERLOADED."""

    def __init__(self, model: str) -> None:
        super().__init__(
            ApiError(503, "OVERLOADED", f"model '{model}' ran out of memory on this image; retry later")
        )


#: Allocator messages of an out-of-memory (CUDA, the CPU allocator, MPS).
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (CUDA), or a RuntimeError whose message says the allocator failed."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back before a retry (no-op without CUDA)."""
    torch.cuda.empty_cache()  # does nothing where CUDA was never initialised
