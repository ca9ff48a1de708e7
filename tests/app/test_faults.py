"""Faults: bad checkpoints at start (clear message, exit 1) and out-of-memory during inference
(the batch is split and retried; an image that fails alone gets 503 OVERLOADED).

A crashed replica is restarted by the orchestrator (tests/deploy/test_manifests.py checks the
restart policies; tests/deploy/test_nginx.py kills a replica with SIGKILL under load)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

import app.__main__ as app_main
from app.batching import MicroBatcher, is_out_of_memory
from app.errors import ApiError
from app.metrics import Metrics
from models import Classifier
from tests import checkpoint_factory as cf
from tests.app.harness import serve
from tests.app.helpers import encode, jpeg, png

TINY = 1 / 16

# -- bad checkpoints at start ---------------------------------------------------------------------


@pytest.fixture
def start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[[Path], tuple[int, str]]:
    """``python -m app``'s main() in this process (no second torch import): (exit code, stderr)."""
    monkeypatch.setattr(app_main, "configure_logging", lambda *a, **k: None)
    threads = torch.get_num_threads()

    def run(models_file: Path) -> tuple[int, str]:
        for name in list(os.environ):
            if name.startswith("VISION_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("VISION_MODELS_FILE", str(models_file))
        monkeypatch.setenv("VISION_DEVICE", "cpu")
        capsys.readouterr()
        try:
            code = app_main.main(["--port", "1"])  # never reached: loading fails first
        finally:
            torch.set_num_threads(threads)
        return code, capsys.readouterr().err

    return run


def models_toml(
    folder: Path, weights: str, *, task: str = "classify", arch: str = "vgg16", extra: str = ""
) -> Path:
    path = folder / "models.toml"
    path.write_text(
        f'[[models]]\nname = "m"\ntask = "{task}"\narch = "{arch}"\nformat = "torchvision"\n'
        f'weights = "{weights}"\n{extra}'
    )
    return path


def one_message(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, stderr
    assert lines[0].startswith("vision-serve: "), stderr
    return stderr


def test_swapped_checkpoint_detector_where_a_classifier_is_expected(
    tmp_path: Path, start: Callable[[Path], tuple[int, str]]
) -> None:
    cf.write_torchvision_ssd300(tmp_path / "vgg16.pth", width=TINY)  # the wrong file under the right name
    code, err = start(models_toml(tmp_path, "vgg16.pth"))
    assert code == 1
    message = one_message(err)
    assert "vgg16.pth" in message and "detector" in message and "classify" in message


def test_swapped_checkpoint_classifier_where_a_detector_is_expected(
    tmp_path: Path, start: Callable[[Path], tuple[int, str]]
) -> None:
    cf.write_torchvision_vgg16(tmp_path / "ssd.pth", width=TINY)
    code, err = start(models_toml(tmp_path, "ssd.pth", task="detect", arch="ssd300"))
    assert code == 1
    message = one_message(err)
    assert "ssd.pth" in message and "classifier" in message and "detect" in message


def test_checkpoint_of_another_arch(tmp_path: Path, start: Callable[[Path], tuple[int, str]]) -> None:
    cf.write_torchvision_vgg16_bn(tmp_path / "bn.pth", width=TINY)
    code, err = start(models_toml(tmp_path, "bn.pth"))  # says vgg16, holds vgg16_bn
    assert code == 1
    message = one_message(err)
    assert "bn.pth" in message and "vgg16_bn" in message


def test_corrupt_checkpoint(tmp_path: Path, start: Callable[[Path], tuple[int, str]]) -> None:
    good = cf.write_torchvision_ssd300(tmp_path / "good.pth", width=TINY)
    data = good.read_bytes()
    (tmp_path / "bad.pth").write_bytes(data[:-300] + bytes(300))  # the zip's directory overwritten
    code, err = start(models_toml(tmp_path, "bad.pth", task="detect", arch="ssd300"))
    assert code == 1
    message = one_message(err)
    assert "bad.pth" in message and "corrupt" in message


def test_damaged_tensor_bytes_are_caught_by_the_sha256(
    tmp_path: Path, start: Callable[[Path], tuple[int, str]]
) -> None:
    # zeroed bytes inside a tensor still unpickle; only the pinned digest tells
    good = cf.write_torchvision_vgg16(tmp_path / "good.pth", width=TINY)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    (tmp_path / "rot.pth").write_bytes(bytes(data))
    code, err = start(models_toml(tmp_path, "rot.pth", extra=f'sha256 = "{digest}"\n'))
    assert code == 1
    message = one_message(err)
    assert "rot.pth" in message and "SHA-256 mismatch" in message


def test_garbage_file(tmp_path: Path, start: Callable[[Path], tuple[int, str]]) -> None:
    (tmp_path / "junk.pth").write_bytes(os.urandom(4096))
    code, err = start(models_toml(tmp_path, "junk.pth"))
    assert code == 1
    assert "junk.pth" in one_message(err)


# -- out of memory: split and retry ---------------------------------------------------------------


class OomAbove:
    """A predict that runs out of memory on batches larger than ``capacity`` and on ``poison``."""

    def __init__(
        self, capacity: int, poison: object = None, error: Callable[[], Exception] | None = None
    ) -> None:
        self.capacity = capacity
        self.poison = poison
        self.error = error or (
            lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        )
        self.calls: list[list[object]] = []
        self.lock = threading.Lock()

    def __call__(self, values: list[object]) -> list[object]:
        with self.lock:
            self.calls.append(list(values))
        if len(values) > self.capacity or self.poison in values:
            raise self.error()
        return [("out", v) for v in values]


def batcher(
    predict: Callable[[list[Any]], Sequence[Any]], metrics: Metrics | None = None
) -> MicroBatcher[Any, Any]:
    b: MicroBatcher[Any, Any] = MicroBatcher(
        "m", predict, max_batch_size=8, max_delay_s=5.0, max_queue=64, metrics=metrics
    )
    b.start()
    return b


def far() -> float:
    return asyncio.get_running_loop().time() + 60


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("CUDA error: out of memory"),
        lambda: RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
async def test_an_oom_batch_is_halved_until_it_fits(error: Callable[[], Exception]) -> None:
    predict = OomAbove(capacity=2, error=error)
    b = batcher(predict)
    try:
        values = list(range(8))  # one request of 8 fills the batch at once
        assert await b.submit(values, far()) == [("out", v) for v in values]
    finally:
        await b.stop()
    sizes = [len(c) for c in predict.calls]
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # 8 -> 4+4 -> 2+2 each; order kept
    assert [v for c in predict.calls if len(c) <= 2 for v in c] == values


async def test_an_image_that_fails_alone_gets_503_and_its_batch_neighbours_answers() -> None:
    metrics = Metrics()
    predict = OomAbove(capacity=8, poison="huge")
    b = batcher(predict, metrics)
    try:
        answers = await asyncio.gather(
            b.submit(["a", "b"], far()),
            b.submit(["huge"], far()),
            b.submit(["c", "d", "e", "f", "g"], far()),  # 8 images: the batch closes now
            return_exceptions=True,
        )
    finally:
        await b.stop()
    first, poisoned, third = answers
    assert first == [("out", "a"), ("out", "b")]
    assert third == [("out", v) for v in "cdefg"]
    assert isinstance(poisoned, ApiError) and poisoned.status_code == 503 and poisoned.code == "OVERLOADED"
    assert poisoned.headers["Retry-After"] and "out of memory" in poisoned.message
    assert ["huge"] in predict.calls  # it was tried alone before giving up


async def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    def predict(values: list[object]) -> list[object]:
        calls.append(len(values))
        raise RuntimeError("size mismatch in layer 3")

    b = batcher(predict)
    try:
        with pytest.raises(ApiError) as err:
            await b.submit(list(range(8)), far())
    finally:
        await b.stop()
    assert err.value.status_code == 500 and calls == [8]


def test_out_of_memory_recognition() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("whatever"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")
    )
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found Half"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not from an allocator


class OomClassifier:
    """Wraps a classifier's predict: out of memory on batches larger than ``capacity`` and on any
    batch holding a one-colour image (``poison``), once :attr:`armed` (the warm-up passes)."""

    def __init__(self, real: Callable[..., Any], capacity: int) -> None:
        self.real = real
        self.capacity = capacity
        self.armed = False
        self.sizes: list[int] = []

    def __call__(self, model: Classifier, batch: torch.Tensor, top_k: Any = 5) -> Any:
        if self.armed:
            self.sizes.append(int(batch.shape[0]))
            one_colour = any(float(image.flatten(1).std(dim=1).max()) < 1e-4 for image in batch)
            if batch.shape[0] > self.capacity or one_colour:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.real(model, batch, top_k=top_k)


@pytest.fixture
def oom_classifier(monkeypatch: pytest.MonkeyPatch) -> OomClassifier:
    """Every classifier's predict (the served ones are copies) runs through the fake."""
    fake = OomClassifier(Classifier.predict, capacity=1)

    def predict(model: Classifier, batch: torch.Tensor, top_k: Any = 5) -> Any:
        return fake(model, batch, top_k)

    monkeypatch.setattr(Classifier, "predict", predict)
    return fake


def upload(name: str, data: bytes) -> tuple[str, tuple[str, bytes]]:
    return ("file", (name, data))


async def test_oom_over_http_splits_a_real_models_batch(
    tiny_models_file: Path, oom_classifier: OomClassifier, client: httpx.AsyncClient
) -> None:
    images = [jpeg(seed=1), png(seed=2), jpeg(seed=3), png(seed=4)]
    async with serve(tiny_models_file, max_batch_size=4, max_delay_ms=5000) as one_batch:
        oom_classifier.armed = True
        two_requests = await asyncio.gather(
            one_batch.post("/v1/classify", params={"top_k": 3}, files=[upload("a", i) for i in images[:2]]),
            one_batch.post("/v1/classify", params={"top_k": 3}, files=[upload("b", i) for i in images[2:]]),
        )
        assert [r.status_code for r in two_requests] == [200, 200], [r.text for r in two_requests]
        assert oom_classifier.sizes == [4, 2, 1, 1, 2, 1, 1]  # one batch of 4, halved twice
    oom_classifier.armed = False
    got = [r for response in two_requests for r in response.json()["results"]]
    for image, result in zip(images, got, strict=True):  # the same as without the split
        alone = await client.post("/v1/classify", params={"top_k": 3}, files=[upload("x", image)])
        assert result["predictions"] == alone.json()["results"][0]["predictions"]


async def test_oom_on_one_image_alone_is_503_and_its_neighbour_is_answered(
    tiny_models_file: Path, oom_classifier: OomClassifier
) -> None:
    black = encode(Image.new("RGB", (32, 32), (0, 0, 0)), "PNG")
    async with serve(tiny_models_file, max_batch_size=2, max_delay_ms=5000) as client:
        oom_classifier.armed = True
        oom_classifier.capacity = 2
        poisoned, fine = await asyncio.gather(
            client.post("/v1/classify", files=[upload("black", black)]),
            client.post("/v1/classify", files=[upload("photo", jpeg(seed=5))]),
        )
        assert oom_classifier.sizes[0] == 2  # they shared a batch
        assert fine.status_code == 200, fine.text
        assert poisoned.status_code == 503 and poisoned.json()["code"] == "OVERLOADED"
        assert poisoned.headers["Retry-After"]
        assert 'vision_rejects_total{reason="OVERLOADED"}' in (await client.get("/metrics")).text
