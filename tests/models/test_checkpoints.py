"""Checkpoint files: the factory imitates real ones, every format loads, every load error explains itself."""

from __future__ import annotations

import datetime
import hashlib
import io
import pickle
import random
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor

from models import CheckpointError, ModelConfigError, ModelSpec, load_model
from models.checkpoints import (
    PROJECT_FORMAT,
    KeyProblem,
    build_model,
    detect_layout,
    fit_state_dict,
    read_checkpoint,
    read_state_dict,
    save_project_checkpoint,
    sha256_file,
    unwrap_state_dict,
)
from models.labels import COCO_CATEGORIES, IMAGENET_CATEGORIES, VOC_CLASSES
from models.ssd import SSD300_COCO, SSD300_VOC, SSD512_VOC
from tests import checkpoint_factory as cf
from tests.models.conftest import TINY
from tests.models.ssd_reference import BOOK_SSD300_KEYS

VGG_LABELS = ("ants", "bees")


def _spec(
    path: Path,
    task: str = "detect",
    arch: str = "ssd300",
    fmt: str = "auto",
    labels: tuple[str, ...] | None = None,
    **kw: Any,
) -> ModelSpec:
    return ModelSpec(
        name="m",
        task=task,  # type: ignore[arg-type]  # a str: the tests give unknown tasks on purpose
        arch=arch,
        format=fmt,
        weights=path,
        labels=labels,
        **kw,
    )


def _error(exc: type[Exception], spec: ModelSpec) -> str:
    with pytest.raises(exc) as info:
        load_model(spec)
    return str(info.value)


# --------------------------------------------------------------------------- the factory imitates real files


def test_factory_book_ssd300_matches_the_reference_key_table() -> None:
    sd = cf.book_ssd_state_dict(21, 1.0)
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, s) for k, s, _ in BOOK_SSD300_KEYS]
    assert tuple(k for k, _, _ in BOOK_SSD300_KEYS) == cf.BOOK_SSD_KEYS
    assert all(v.dtype == torch.float32 for v in sd.values())
    amdegroot = list(cf.book_ssd_state_dict(21, 1.0, amdegroot_order=True))
    assert amdegroot.index("L2Norm.weight") == 30 and sorted(amdegroot) == sorted(sd)  # ssd.pytorch's order


def test_factory_torchvision_files_load_strictly_into_torchvision() -> None:
    with torch.device("meta"):
        tv_ssd = torchvision.models.detection.ssd300_vgg16(
            weights=None, weights_backbone=None, num_classes=91
        )
        tv_vgg = torchvision.models.vgg16(weights=None)
        tv_vgg_bn = torchvision.models.vgg16_bn(weights=None)
    ssd_sd = cf.torchvision_ssd_state_dict(91, 1.0)
    # same names, same order, same shapes as torchvision's own state_dict
    assert [(k, v.shape) for k, v in ssd_sd.items()] == [(k, v.shape) for k, v in tv_ssd.state_dict().items()]
    tv_ssd.load_state_dict(ssd_sd, strict=True, assign=True)
    vgg_sd = cf.vgg16_state_dict(1000, 1.0)
    assert [(k, v.shape) for k, v in vgg_sd.items()] == [(k, v.shape) for k, v in tv_vgg.state_dict().items()]
    tv_vgg.load_state_dict(vgg_sd, strict=True, assign=True)
    tv_vgg_bn.load_state_dict(cf.vgg16_state_dict(1000, 1.0, bn=True, num_batches_tracked=False), assign=True)


def test_factory_files_have_the_real_on_disk_layout(tiny: dict[str, Path]) -> None:
    import zipfile

    # 2017-2019 files (torchvision VGG16, the book, ssd.pytorch) predate the zip format
    for name in ("tv_vgg16", "tv_vgg16_bn", "book_vgg16", "book_ssd300", "amdegroot_ssd300"):
        assert not zipfile.is_zipfile(tiny[name]), name
    for name in ("tv_ssd300", "project_ssd300"):
        assert zipfile.is_zipfile(tiny[name]), name
    sd = torch.load(tiny["dp_ssd300"], map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in sd) and len(sd) == 71


# --------------------------------------------------------------------------- reading


@pytest.mark.cuda
def test_gpu_saved_file_needs_map_location_and_loads_on_the_cpu(tiny: dict[str, Path]) -> None:
    path = tiny["book_vgg16"]
    seen: list[str] = []

    def record(storage: Any, location: str) -> Any:
        seen.append(location)
        return storage

    torch.load(path, map_location=record, weights_only=True)
    assert seen and set(seen) == {"cuda:0"}  # every storage recorded on the GPU, as the book's file
    if torch.cuda.is_available():
        raw = torch.load(path, weights_only=True)
        assert next(iter(raw.values())).device.type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    sd = read_state_dict(path, map_location="cpu")
    assert {t.device.type for t in sd.values()} == {"cpu"} and sd["classifier.6.weight"].shape == (2, 256)
    clf = load_model(_spec(path, "classify", "vgg16", "state_dict", VGG_LABELS))
    assert clf.info.device == "cpu" and next(clf.model.parameters()).device.type == "cpu"


def test_sha256_is_checked_before_unpickling(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny["book_ssd300"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == digest
    _, got = read_checkpoint(path, "cpu", expected_sha256=digest.upper())
    assert got == digest

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load called before the hash check")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, "cpu", expected_sha256="0" * 64)
    message = str(info.value)
    assert "SHA-256 mismatch" in message and digest in message and "0" * 64 in message
    assert str(path) in message and "replace it" in message


def test_unwraps_training_script_dicts_and_strips_module_prefixes() -> None:
    sd = cf.book_ssd_state_dict(3, TINY)
    wrapped = {"epoch": 12, "model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}
    for obj in (wrapped, {"state_dict": sd}, {"model": sd}, sd):
        out = unwrap_state_dict(obj)
        assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)
        assert detect_layout(obj) == "ssd.pytorch"


def test_data_parallel_and_amdegroot_files_give_the_books_answers(tiny: dict[str, Path]) -> None:
    specs = {
        name: _spec(tiny[name], fmt="ssd.pytorch", labels=VOC_CLASSES)
        for name in ("book_ssd300", "dp_ssd300", "amdegroot_ssd300")
    }
    x = torch.rand(2, 3, 300, 300) * 255 - 120
    outs = {}
    for name, spec in specs.items():
        det = load_model(spec)
        with torch.no_grad():
            outs[name] = det.model(x)
    for name in ("dp_ssd300", "amdegroot_ssd300"):  # same seed, same tensors
        assert all(torch.equal(a, b) for a, b in zip(outs[name], outs["book_ssd300"], strict=True))


# --------------------------------------------------------------------------- layouts and "auto"


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("tv_vgg16", "vgg"),
        ("tv_vgg16_bn", "vgg_bn"),
        ("book_vgg16", "vgg"),
        ("book_ssd300", "ssd.pytorch"),
        ("dp_ssd300", "ssd.pytorch"),
        ("amdegroot_ssd300", "ssd.pytorch"),
        ("book_ssd512", "ssd.pytorch"),
        ("tv_ssd300", "torchvision-ssd"),
        ("project_ssd300", "project"),
        ("project_vgg16", "project"),
    ],
)
def test_detect_layout(tiny: dict[str, Path], name: str, layout: str) -> None:
    obj, _ = read_checkpoint(tiny[name])
    assert detect_layout(obj) == layout


def test_detect_layout_odd_inputs() -> None:
    base = {f"{i}.weight": torch.zeros(1) for i in (0, 2, 31, 33)}  # vgg16_reducedfc.pth
    assert detect_layout(base) == "ssd-vgg-base"
    assert detect_layout({"fc.weight": torch.zeros(1)}) == "unknown"
    assert detect_layout([torch.zeros(1)]) == "unknown"


@pytest.mark.parametrize(
    ("name", "task", "arch", "labels", "fmt", "size", "n_labels"),
    [
        (
            "tv_vgg16",
            "classify",
            "vgg16",
            None,
            "torchvision",
            (224, 224),
            1000,
        ),  # 1000 classes: ImageNet preset
        ("tv_vgg16_bn", "classify", "vgg16_bn", None, "torchvision", (224, 224), 1000),
        (
            "book_vgg16",
            "classify",
            "vgg16",
            VGG_LABELS,
            "state_dict",
            (224, 224),
            2,
        ),  # other counts: the book
        ("book_ssd300", "detect", "ssd300", VOC_CLASSES, "ssd.pytorch", (300, 300), 20),
        ("book_ssd512", "detect", "ssd512", VOC_CLASSES, "ssd.pytorch", (512, 512), 20),
        ("tv_ssd300", "detect", "ssd300", None, "torchvision", (300, 300), 91),
        ("project_ssd300", "detect", "ssd300", None, "project", (300, 300), 20),
        ("project_vgg16", "classify", "vgg16", None, "project", (224, 224), 3),
    ],
)
def test_auto_format(
    tiny: dict[str, Path],
    name: str,
    task: str,
    arch: str,
    labels: tuple[str, ...] | None,
    fmt: str,
    size: tuple[int, int],
    n_labels: int,
) -> None:
    model = load_model(_spec(tiny[name], task, arch, "auto", labels))
    assert (model.info.format, model.info.input_size, model.info.num_classes) == (fmt, size, n_labels)
    assert model.info.sha256 == sha256_file(tiny[name])


def test_format_semantics(tiny: dict[str, Path]) -> None:
    tv_vgg = build_model(_spec(tiny["tv_vgg16"], "classify", "vgg16"))
    assert (tv_vgg.transform.resize, tv_vgg.transform.crop) == (256, 224)  # type: ignore[union-attr]
    assert tv_vgg.labels == list(IMAGENET_CATEGORIES)
    book_vgg = build_model(_spec(tiny["book_vgg16"], "classify", "vgg16", "state_dict", VGG_LABELS))
    assert (book_vgg.transform.resize, book_vgg.transform.crop) == (224, 224)  # type: ignore[union-attr]
    # 1000 classes in the book's format: the book's preprocessing, but the caller's labels
    overridden = build_model(
        _spec(
            tiny["tv_vgg16"],
            "classify",
            "vgg16",
            "state_dict",
            tuple(f"c{i}" for i in range(1000)),
            resize=300,
            crop=256,
        )
    )
    assert (overridden.transform.resize, overridden.transform.crop) == (300, 256)  # type: ignore[union-attr]

    book = build_model(_spec(tiny["book_ssd300"], labels=VOC_CLASSES))
    assert (book.ssd_config, book.class_offset, book.postprocess.pre_nms_top_k) == (SSD300_VOC, 1, 200)  # type: ignore[union-attr]
    assert book.postprocess.max_per_image is None  # type: ignore[union-attr]
    assert build_model(_spec(tiny["book_ssd512"], arch="ssd512", labels=VOC_CLASSES)).ssd_config == SSD512_VOC
    tv = build_model(_spec(tiny["tv_ssd300"]))
    assert (tv.ssd_config, tv.class_offset, tv.labels) == (SSD300_COCO, 0, list(COCO_CATEGORIES))
    assert tv.postprocess.max_per_image == 200 and tv.postprocess.clip_before_nms  # type: ignore[union-attr]
    # a custom torchvision SSD: labels without background get "__background__" in front
    custom = cf.write_torchvision_ssd300(tiny["tv_ssd300"].parent / "tv3.pth", num_classes=3, width=TINY)
    assert build_model(_spec(custom, labels=("cat", "dog"))).labels == ["__background__", "cat", "dog"]


# --------------------------------------------------------------------------- load errors and their messages


def test_missing_file(tmp_path: Path) -> None:
    message = _error(CheckpointError, _spec(tmp_path / "nope.pth", labels=VOC_CLASSES))
    assert "weights file not found" in message and str((tmp_path / "nope.pth").absolute()) in message
    message = _error(CheckpointError, _spec(tmp_path, labels=VOC_CLASSES))
    assert "not a file" in message


def test_sha256_mismatch_through_load_model(tiny: dict[str, Path]) -> None:
    message = _error(CheckpointError, _spec(tiny["book_ssd300"], labels=VOC_CLASSES, sha256="ab" * 32))
    assert "SHA-256 mismatch" in message and sha256_file(tiny["book_ssd300"]) in message


def test_pickled_whole_model_is_refused(tiny: dict[str, Path]) -> None:
    message = _error(CheckpointError, _spec(tiny["pickled_model"], "classify", "vgg16"))
    assert str(tiny["pickled_model"]) in message
    assert (
        "holds a pickled Python object (e.g. torch.save(model)), not a state_dict; save model.state_dict()"
    ) in message
    assert "torch.nn" in message  # names the class it refused


@pytest.mark.parametrize("name", ["truncated_zip", "truncated_legacy"])
def test_truncated_file(tiny: dict[str, Path], name: str) -> None:
    message = _error(CheckpointError, _spec(tiny[name], labels=VOC_CLASSES))
    assert str(tiny[name]) in message and "truncated or corrupt" in message and "again" in message


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "random.pth"
    path.write_bytes(rng.randbytes(rng.randrange(1, 200_000)))
    message = _error(CheckpointError, _spec(path, labels=VOC_CLASSES))
    assert f"{path} is not a PyTorch checkpoint" in message and "neither" in message
    assert "pickled" not in message and "state_dict" not in message  # not "a pickled object"


def _plain_pickle(obj: Any, protocol: int) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


def _torch_bytes(obj: Any, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kw)
    return buffer.getvalue()


def _zip_of(names: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in names.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: b"", ["is empty (0 bytes), not a PyTorch checkpoint"]),
        (
            lambda: b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n",
            ["is not a PyTorch checkpoint", "it starts with text: '<!DOCTYPE html> <html><body>404"],
        ),
        (
            lambda: _zip_of({"weights/readme.txt": b"hello", "weights/w.npy": b"\x93NUMPY"}),
            [
                "is a zip archive but not a PyTorch checkpoint",
                "weights/readme.txt, weights/w.npy",
                "data.pkl",
            ],
        ),
        (
            lambda: _plain_pickle({"when": datetime.date(2024, 1, 1)}, 2),
            [
                "is a plain Python pickle (pickle.dump), not a file written by torch.save",
                "refers to datetime.date, refused because unpickling objects can run code",
            ],
        ),
        (
            lambda: _plain_pickle({"w": torch.zeros(2)}, pickle.DEFAULT_PROTOCOL),
            ["is a plain Python pickle (pickle.dump)", "torch.save(model.state_dict(), path)"],
        ),
        (
            lambda: _torch_bytes(torch.nn.Linear(2, 2), _use_new_zipfile_serialization=False),
            [
                "holds a pickled Python object (e.g. torch.save(model))",
                "refused: torch.nn.modules.linear.Linear",
            ],
        ),
        (
            lambda: _torch_bytes(
                {"w": torch.zeros(2)}, _use_new_zipfile_serialization=False, pickle_protocol=4
            ),
            ["legacy-format torch.save file written with pickle protocol 4", "weights_only"],
        ),
    ],
    ids=[
        "empty",
        "web-page",
        "other-zip",
        "pickle-with-object",
        "pickle-of-tensors",
        "legacy-whole-model",
        "legacy-protocol-4",
    ],
)
def test_each_kind_of_unreadable_file_is_told_apart(
    tmp_path: Path, make: Callable[[], bytes], expected: list[str]
) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(make())
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for words in expected:
        assert words in message


@pytest.mark.parametrize("name", ["book_ssd300", "tv_ssd300"])
def test_damaged_files_give_a_checkpoint_error_or_load(
    tiny: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """Bytes overwritten or cut anywhere (headers, pickle, tensor data): never another exception."""
    data = tiny[name].read_bytes()
    rng = random.Random(name)
    path = tmp_path / "damaged.pth"
    outcomes = []
    for offset in [*sorted(rng.sample(range(len(data)), 24)), 0, 1, 2, 3, 5, 11, 30]:
        damaged = bytearray(data)
        damaged[offset : offset + 4] = rng.randbytes(4)
        for variant in (bytes(damaged), data[:offset]):
            path.write_bytes(variant)
            try:
                read_checkpoint(path)
                outcomes.append("loaded")
            except CheckpointError as e:
                outcomes.append("error")
                assert str(path) in str(e)
    assert "error" in outcomes


@pytest.mark.parametrize("obj", [[torch.zeros(1)], torch.zeros(3), {"weights": [1, 2]}, {}])
def test_not_a_state_dict(tmp_path: Path, obj: Any) -> None:
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    message = _error(CheckpointError, _spec(path, "classify", "vgg16"))
    assert "not a state_dict" in message and str(path) in message and "model.state_dict()" in message


def test_unknown_layout_and_ssd_training_base(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, path)
    message = _error(CheckpointError, _spec(path, "classify", "vgg16"))
    assert "does not know" in message and "conv1.weight" in message
    ssd = cf.book_ssd_state_dict(21, TINY)
    base = {k.removeprefix("vgg."): v for k, v in ssd.items() if k.startswith("vgg.")}
    torch.save(base, tmp_path / "vgg16_reducedfc.pth")
    message = _error(CheckpointError, _spec(tmp_path / "vgg16_reducedfc.pth", labels=VOC_CLASSES))
    assert "VGG16 base an SSD starts training from" in message


def _vgg_file(tmp_path: Path, edit: Mapping[str, Tensor | None]) -> Path:
    sd: dict[str, Tensor] = cf.vgg16_state_dict(2, TINY)
    for key, value in edit.items():
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    return path


def _named_keys(message: str) -> set[str]:
    """Every parameter name (``a.b.weight``, ``L2Norm.weight``, ``x.running_mean`` ...) a message names."""
    return set(
        re.findall(r"[A-Za-z_][\w.]*\.(?:weight|bias|running_mean|running_var|scale_weight)\b", message)
    )


def _shape(shape: Sequence[int]) -> str:
    return str(list(shape))


def test_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    spec = _spec(
        _vgg_file(tmp_path, {"classifier.3.weight": None, "classifier.3.bias": None}),
        "classify",
        "vgg16",
        "state_dict",
        VGG_LABELS,
    )
    message = _error(CheckpointError, spec)
    assert "does not fit a 2-class vgg16 of width 0.0625" in message
    assert (
        "2 missing: classifier.3.weight (expected shape [256, 256]), classifier.3.bias (expected shape [256])"
    ) in message

    extra = {f"features.{i}.weight": torch.zeros(1) for i in range(40, 46)}
    message = _error(
        CheckpointError, _spec(_vgg_file(tmp_path, extra), "classify", "vgg16", "state_dict", VGG_LABELS)
    )
    assert re.search(r"6 unexpected: features\.40\.weight \(shape \[1\]\), .* \(and 2 more\)", message)

    shaped = {"features.2.weight": torch.zeros(5, 4, 3, 3)}
    message = _error(
        CheckpointError, _spec(_vgg_file(tmp_path, shaped), "classify", "vgg16", "state_dict", VGG_LABELS)
    )
    assert (
        "1 with the wrong shape: features.2.weight has shape [5, 4, 3, 3], expected [4, 4, 3, 3]" in message
    )


def _book_ssd_file(tmp_path: Path, edit: Mapping[str, Tensor | None], size: int = 300) -> Path:
    sd = cf.book_ssd_state_dict(21, TINY, size)
    for key, value in edit.items():
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    path = tmp_path / "edited_ssd.pth"
    torch.save(sd, path)
    return path


# The first tensors (vgg.0.weight, conf.0.weight, features.0.weight, classifier.6.*) are the ones a
# reader is tempted to take the width and class count from: breaking them must not make the
# other, intact tensors look wrong. Each message names only the broken key, with its shapes.


@pytest.mark.parametrize(
    "key",
    [
        "conf.0.weight",
        "conf.3.bias",
        "loc.5.weight",
        "loc.0.bias",
        "L2Norm.weight",
        "vgg.0.weight",
        "extras.7.weight",
    ],
)
def test_book_ssd_missing_tensor_is_named_with_its_shape(tmp_path: Path, key: str) -> None:
    expected = cf.book_ssd_state_dict(21, TINY)[key].shape
    message = _error(CheckpointError, _spec(_book_ssd_file(tmp_path, {key: None}), labels=VOC_CLASSES))
    assert "does not fit a 21-class SSD300 of width 0.0625 (ssd.pytorch layout)" in message
    assert f"1 missing: {key} (expected shape {_shape(expected)})" in message
    assert _named_keys(message) == {key}, message


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("vgg.0.weight", (5, 3, 3, 3)),  # width would read 5/64 from it
        ("vgg.0.weight", (4, 1, 3, 3)),  # a greyscale first conv
        ("conf.0.weight", (85, 32, 3, 3)),  # 85 rows: not 4 boxes x a class count
        ("conf.0.weight", (4 * 3, 32, 3, 3)),  # reads as 3 classes
        ("L2Norm.weight", (64,)),
    ],
)
def test_book_ssd_misshaped_tensor_is_named_with_both_shapes(
    tmp_path: Path, key: str, shape: tuple[int, ...]
) -> None:
    expected = cf.book_ssd_state_dict(21, TINY)[key].shape
    message = _error(
        CheckpointError, _spec(_book_ssd_file(tmp_path, {key: torch.zeros(shape)}), labels=VOC_CLASSES)
    )
    assert "does not fit a 21-class SSD300 of width 0.0625" in message
    assert f"1 with the wrong shape: {key} has shape {_shape(shape)}, expected {_shape(expected)}" in message
    assert _named_keys(message) == {key}, message


def test_ssd512_with_two_broken_tensors_names_both(tmp_path: Path) -> None:
    path = _book_ssd_file(tmp_path, {"loc.6.weight": None, "extras.3.weight": torch.zeros(3, 3, 3, 3)}, 512)
    message = _error(CheckpointError, _spec(path, arch="ssd512", labels=VOC_CLASSES))
    assert "a 21-class SSD512 of width 0.0625" in message and "77 of its 78 tensors" in message
    assert "extras.3.weight has shape [3, 3, 3, 3], expected [16, 8, 3, 3]" in message
    assert "loc.6.weight (expected shape [16, 16, 3, 3])" in message
    assert _named_keys(message) == {"loc.6.weight", "extras.3.weight"}


@pytest.mark.parametrize(
    "key",
    [
        "head.classification_head.module_list.0.weight",
        "head.regression_head.module_list.5.bias",
        "backbone.features.0.weight",
        "backbone.scale_weight",
    ],
)
def test_torchvision_ssd_missing_tensor_is_named_as_the_file_names_it(tmp_path: Path, key: str) -> None:
    sd = cf.torchvision_ssd_state_dict(91, TINY)
    expected = sd.pop(key).shape
    torch.save(sd, tmp_path / "tv.pth")
    message = _error(CheckpointError, _spec(tmp_path / "tv.pth"))
    assert "does not fit a 91-class SSD300 of width 0.0625 (torchvision's layout)" in message
    assert f"1 missing: {key} (expected shape {_shape(expected)})" in message
    assert _named_keys(message) == {key}, message  # torchvision's names, not the book's


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("classifier.0.weight", (256, 999)),  # fc6 of a network with another input size
        ("classifier.3.weight", (100, 256)),
        ("classifier.3.bias", (100,)),
        ("features.0.weight", (5, 3, 3, 3)),  # the one the width is read from
    ],
)
def test_vgg_misshaped_layer_is_named_with_both_shapes(
    tmp_path: Path, key: str, shape: tuple[int, ...]
) -> None:
    expected = cf.vgg16_state_dict(2, TINY)[key].shape
    spec = _spec(
        _vgg_file(tmp_path, {key: torch.zeros(shape)}), "classify", "vgg16", "state_dict", VGG_LABELS
    )
    message = _error(CheckpointError, spec)
    assert (
        "does not fit a 2-class vgg16 of width 0.0625, the network 31 of its 32 tensors describe" in message
    )
    assert f"1 with the wrong shape: {key} has shape {_shape(shape)}, expected {_shape(expected)}" in message
    assert _named_keys(message) == {key}, message


def test_vgg_whose_last_layer_disagrees_with_itself_gives_both_readings(tmp_path: Path) -> None:
    """classifier.6.weight says 3 classes, classifier.6.bias 2: nothing in the file tells which is
    broken, so the message gives both readings instead of blaming one at random."""
    spec = _spec(
        _vgg_file(tmp_path, {"classifier.6.weight": torch.zeros(3, 256)}),
        "classify",
        "vgg16",
        "state_dict",
        VGG_LABELS,
    )
    message = _error(CheckpointError, spec)
    assert "3-class vgg16" in message and "2-class vgg16" in message
    assert "classifier.6.bias has shape [2], expected [3]" in message
    assert "classifier.6.weight has shape [3, 256], expected [2, 256]" in message


def test_inference_reads_the_majority_of_tensors() -> None:
    sd = cf.book_ssd_state_dict(21, TINY)
    sd["vgg.0.weight"], sd["conf.0.weight"] = torch.zeros(5, 3, 3, 3), torch.zeros(12, 32, 3, 3)
    fit = fit_state_dict(sd, "ssd")
    assert (fit.arch, fit.num_classes, fit.width, fit.matched) == ("ssd300", 21, TINY, 69)
    assert fit.problems == (
        KeyProblem("vgg.0.weight", (5, 3, 3, 3), (4, 3, 3, 3)),
        KeyProblem("conf.0.weight", (12, 32, 3, 3), (84, 32, 3, 3)),
    )
    good = fit_state_dict(cf.book_ssd_state_dict(7, 1 / 8, 512), "ssd")
    assert (good.arch, good.num_classes, good.width, good.problems) == ("ssd512", 7, 1 / 8, ())
    vgg = fit_state_dict(cf.vgg16_state_dict(5, 1 / 8, bn=True, num_batches_tracked=False), "vgg")
    assert (vgg.arch, vgg.num_classes, vgg.width, vgg.problems) == ("vgg16_bn", 5, 1 / 8, ())


def test_nothing_to_read_the_class_count_from(tmp_path: Path) -> None:
    sd = {k: v for k, v in cf.book_ssd_state_dict(21, TINY).items() if not k.startswith("conf.")}
    torch.save(sd, tmp_path / "headless.pth")
    message = _error(CheckpointError, _spec(tmp_path / "headless.pth", labels=VOC_CLASSES))
    assert "no class head tensor (conf.N.weight / conf.N.bias)" in message
    spec = _spec(
        _vgg_file(tmp_path, {"classifier.6.weight": None, "classifier.6.bias": None}),
        "classify",
        "vgg16",
        "state_dict",
        VGG_LABELS,
    )
    assert "classifier.6.weight and classifier.6.bias" in _error(CheckpointError, spec)


def test_labels_count_is_explained(tiny: dict[str, Path]) -> None:
    message = _error(ModelConfigError, _spec(tiny["book_ssd300"], fmt="ssd.pytorch", labels=("cat", "dog")))
    assert (
        f"{tiny['book_ssd300']} is a 21-class SSD300 in ssd.pytorch layout (20 labels + background), "
        "but the models file gives 2 labels; give 20 (background excluded"
    ) in message
    message = _error(ModelConfigError, _spec(tiny["book_ssd300"], fmt="ssd.pytorch"))
    assert "must give its 20 labels" in message
    message = _error(ModelConfigError, _spec(tiny["book_vgg16"], "classify", "vgg16", "state_dict"))
    assert "is a 2-class vgg16" in message and "must give its 2 labels" in message
    message = _error(ModelConfigError, _spec(tiny["tv_ssd300"], fmt="torchvision", labels=("a", "b")))
    assert "91-class SSD300 in torchvision's layout (91 classes, background at 0)" in message
    message = _error(ModelConfigError, _spec(tiny["project_vgg16"], "classify", "vgg16", labels=("a",)))
    assert "carries 3 labels, but the models file gives 1" in message


def test_format_that_disagrees_with_the_keys(tiny: dict[str, Path]) -> None:
    message = _error(CheckpointError, _spec(tiny["tv_ssd300"], fmt="ssd.pytorch", labels=VOC_CLASSES))
    assert (
        "is in torchvision's SSD layout (backbone.*, head.*), but the models file says "
        "format = 'ssd.pytorch'; use format = 'torchvision'"
    ) in message
    message = _error(CheckpointError, _spec(tiny["book_ssd300"], fmt="torchvision"))
    assert "the book's / ssd.pytorch SSD layout" in message and "use format = 'ssd.pytorch'" in message
    message = _error(CheckpointError, _spec(tiny["book_vgg16"], "classify", "vgg16", "project", VGG_LABELS))
    assert "use format = 'torchvision'" in message
    message = _error(CheckpointError, _spec(tiny["project_ssd300"], fmt="ssd.pytorch"))
    assert "vision-serve project format" in message and "use format = 'project'" in message


def test_arch_and_task_that_disagree_with_the_file(tiny: dict[str, Path]) -> None:
    message = _error(CheckpointError, _spec(tiny["tv_vgg16_bn"], "classify", "vgg16"))
    assert "it has BatchNorm layers" in message and "use arch = 'vgg16_bn'" in message
    message = _error(CheckpointError, _spec(tiny["tv_vgg16"], "classify", "vgg16_bn"))
    assert "no BatchNorm" in message and "use arch = 'vgg16'" in message
    message = _error(CheckpointError, _spec(tiny["book_ssd512"], "detect", "ssd300", labels=VOC_CLASSES))
    assert "21-class SSD512 in ssd.pytorch layout" in message and "use arch = 'ssd512'" in message
    message = _error(CheckpointError, _spec(tiny["project_ssd512"], "detect", "ssd300"))
    assert "use arch = 'ssd512'" in message
    message = _error(CheckpointError, _spec(tiny["tv_vgg16"], "detect", "ssd300"))
    assert "holds a classifier" in message and "task = 'detect'" in message


@pytest.mark.cuda
def test_device_and_precision_errors(tiny: dict[str, Path]) -> None:
    spec = _spec(tiny["tv_vgg16"], "classify", "vgg16")
    for device in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(ModelConfigError, match="unknown device"):
            load_model(spec, device=device)
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            with pytest.raises(ModelConfigError, match="CUDA is not available"):
                load_model(spec, device=device)
    else:
        with pytest.raises(ModelConfigError, match="does not exist"):
            load_model(spec, device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ModelConfigError, match="unknown precision 'int4'"):
        load_model(spec, precision="int4")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the project format


_PLAIN = (str, int, float, bool, type(None), Tensor)


def _assert_plain(obj: Any, where: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), where
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert type(obj) in _PLAIN, f"{where} is a {type(obj).__name__}"


def test_project_file_is_plain_data_and_describes_itself(tiny: dict[str, Path], tmp_path: Path) -> None:
    built = build_model(_spec(tiny["tv_ssd300"]))
    path = save_project_checkpoint(
        tmp_path / "tv.pth",
        built.model,
        task="detect",
        arch="ssd300",
        labels=built.labels,
        preprocess={"kind": "ssd", "size": 300},
        postprocess={"semantics": "torchvision"},
        metadata={"dataset": "coco"},
    )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    _assert_plain(raw)
    assert raw["format"] == PROJECT_FORMAT and raw["version"] == 1 and raw["task"] == "detect"
    assert raw["arch_args"]["ssd_config"]["name"] == "SSD300_COCO"
    assert raw["arch_args"]["ssd_config"]["clamp_centres"] is False
    assert raw["postprocess"]["semantics"] == "torchvision" and raw["postprocess"]["class_offset"] == 0
    assert raw["postprocess"]["config"]["pre_nms_top_k"] == 400 and raw["metadata"] == {"dataset": "coco"}

    again = build_model(_spec(path, fmt="project"))
    assert (again.ssd_config, again.postprocess, again.class_offset) == (SSD300_COCO, built.postprocess, 0)
    assert again.labels == built.labels and again.format == "project"
    sd, sd2 = built.model.state_dict(), again.model.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_project_files_written_by_training(tiny: dict[str, Path]) -> None:
    """The factory writes the documented dict by hand, as training will: it loads with book semantics."""
    det = build_model(_spec(tiny["project_ssd300"], fmt="project"))
    assert det.ssd_config == SSD300_VOC and det.class_offset == 1 and det.labels == list(VOC_CLASSES)
    assert det.metadata["written_by"] == "tests/checkpoint_factory.py"
    assert build_model(_spec(tiny["project_ssd512"], arch="ssd512")).ssd_config == SSD512_VOC
    clf = build_model(_spec(tiny["project_vgg16"], "classify", "vgg16"))
    assert clf.labels == ["ant", "bee", "wasp"] and clf.transform.input_size == (224, 224)


def test_project_file_errors(tmp_path: Path) -> None:
    ckpt = cf.ssd_project_dict(VOC_CLASSES, width=TINY)
    cf.write_project(tmp_path / "v2.pth", {**ckpt, "version": 2})
    message = _error(CheckpointError, _spec(tmp_path / "v2.pth", fmt="project"))
    assert "version 2" in message and "reads version 1" in message
    cf.write_project(tmp_path / "nolabels.pth", {k: v for k, v in ckpt.items() if k != "labels"})
    assert "no 'labels' entry" in _error(CheckpointError, _spec(tmp_path / "nolabels.pth", fmt="project"))
    cf.write_project(tmp_path / "post.pth", {**ckpt, "postprocess": {"semantics": "caffe"}})
    assert "semantics is 'caffe'" in _error(CheckpointError, _spec(tmp_path / "post.pth", fmt="project"))
    cf.write_project(tmp_path / "few.pth", {**ckpt, "labels": ["a", "b"]})
    assert "2 labels for 21 classes" in _error(CheckpointError, _spec(tmp_path / "few.pth", fmt="project"))
    cf.write_project(tmp_path / "pre.pth", {**ckpt, "preprocess": {"kind": "ssd", "size": "large"}})
    assert "cannot be read (ValueError" in _error(CheckpointError, _spec(tmp_path / "pre.pth", fmt="project"))
    cf.write_project(tmp_path / "kind.pth", {**ckpt, "preprocess": {"kind": "classifier", "size": 300}})
    assert "does not suit a ssd300" in _error(CheckpointError, _spec(tmp_path / "kind.pth", fmt="project"))
    boxes = {**ckpt["arch_args"]["ssd_config"], "feature_maps": [37, 19, 10, 5, 3, 1]}
    args = {**ckpt["arch_args"], "ssd_config": boxes}
    cf.write_project(tmp_path / "boxes.pth", {**ckpt, "arch_args": args})
    message = _error(CheckpointError, _spec(tmp_path / "boxes.pth", fmt="project"))
    assert "default boxes (8432) do not match the network's 8732 outputs" in message  # 37^2*4 vs 38^2*4


def test_project_writer_refuses_what_weights_only_cannot_read(tmp_path: Path) -> None:
    from models.ssd import ssd300

    with pytest.raises(ModelConfigError, match=r"metadata\.when is a datetime"):
        import datetime

        save_project_checkpoint(
            tmp_path / "x.pth",
            ssd300(21, width=TINY),
            task="detect",
            arch="ssd300",
            labels=VOC_CLASSES,
            preprocess={"kind": "ssd", "size": 300},
            metadata={"when": datetime.datetime.now()},
        )
    assert not (tmp_path / "x.pth").exists()


def test_project_writer_refuses_a_classifier_that_is_not_shaped_like_vgg(tmp_path: Path) -> None:
    from models.ssd import ssd300

    with pytest.raises(ModelConfigError, match="a classify checkpoint needs a VGG model, got SSD"):
        save_project_checkpoint(
            tmp_path / "x.pth",
            ssd300(21, width=TINY),
            task="classify",
            arch="vgg16",
            labels=[str(i) for i in range(21)],
            preprocess={"kind": "classifier", "resize": 256, "crop": 224},
        )
    assert not (tmp_path / "x.pth").exists()
