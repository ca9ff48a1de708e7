"""python -m models.convert: exact renames, project files that answer identically, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from models import DetectParams, ModelSpec, load_model
from models.convert import main
from models.labels import VOC_CLASSES
from tests import checkpoint_factory as cf

ROOT = Path(__file__).resolve().parents[2]
ALL = DetectParams(score_threshold=0.0, iou_threshold=None, max_detections=None)


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _load(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return sd


@pytest.mark.slow
def test_book_torchvision_round_trip_is_exact_for_all_71_tensors(
    full_book_ssd300: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tv_path, back_path = tmp_path / "tv.pth", tmp_path / "back.pth"
    code, out, _ = _run(capsys, full_book_ssd300, tv_path, "--to", "torchvision")
    assert code == 0 and "wrote" in out and "torchvision layout, 71 tensors" in out
    tv_sd = _load(tv_path)
    with torch.device("meta"):
        tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)
    tv.load_state_dict(tv_sd, strict=True, assign=True)  # every name and shape is torchvision's

    code, out, _ = _run(capsys, tv_path, back_path, "--to", "ssd.pytorch")
    assert code == 0 and "ssd.pytorch layout, 71 tensors" in out
    original = _load(full_book_ssd300)
    back = _load(back_path)
    assert sorted(back) == sorted(original) and len(back) == 71
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)


def test_torchvision_coco_round_trip_and_data_parallel_input(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, tiny["tv_ssd300"], tmp_path / "book.pth", "--to", "ssd.pytorch")[0] == 0
    assert _run(capsys, tmp_path / "book.pth", tmp_path / "tv.pth", "--to", "torchvision")[0] == 0
    a, b = _load(tiny["tv_ssd300"]), _load(tmp_path / "tv.pth")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # module. prefixes are dropped on the way
    assert _run(capsys, tiny["dp_ssd300"], tmp_path / "plain.pth", "--to", "ssd.pytorch")[0] == 0
    assert not any(k.startswith("module.") for k in _load(tmp_path / "plain.pth"))


def _detections(
    path: Path, image: Image.Image, **spec: object
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    model = load_model(ModelSpec(name="m", task="detect", weights=path, **spec))  # type: ignore[arg-type]
    out = model.predict(model.preprocess(image)[None], [image.size], [ALL])[0]
    return out.scores, out.boxes, [model.info.labels[i] for i in out.class_ids]


@pytest.mark.parametrize(
    ("name", "spec", "extra"),
    [
        (
            "book_ssd300_confident",
            {"arch": "ssd300", "format": "ssd.pytorch", "labels": VOC_CLASSES},
            ["--labels", ",".join(VOC_CLASSES)],
        ),
        (
            "book_ssd512",
            {"arch": "ssd512", "format": "ssd.pytorch", "labels": VOC_CLASSES},
            ["--labels-file"],
        ),
        ("tv_ssd300", {"arch": "ssd300", "format": "torchvision"}, []),
    ],
)
def test_detector_to_project_answers_identically(
    tiny: dict[str, Path],
    tmp_path: Path,
    china: Image.Image,
    capsys: pytest.CaptureFixture[str],
    name: str,
    spec: dict[str, object],
    extra: list[str],
) -> None:
    if extra == ["--labels-file"]:
        (tmp_path / "voc.txt").write_text("\n".join(VOC_CLASSES) + "\n\n")
        extra = ["--labels-file", str(tmp_path / "voc.txt")]
    code, out, _ = _run(capsys, tiny[name], tmp_path / "p.pth", "--to", "project", *extra)
    assert code == 0 and "vision-serve project" in out
    before = _detections(tiny[name], china, **spec)
    after = _detections(tmp_path / "p.pth", china, arch=spec["arch"], format="project")
    assert len(before[0]) > 0
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]
    meta = torch.load(tmp_path / "p.pth", map_location="cpu", weights_only=True)["metadata"]
    assert meta["converted_from"] == tiny[name].name and len(meta["source_sha256"]) == 64


@pytest.mark.parametrize(
    ("name", "extra", "fmt"),
    [("tv_vgg16", [], "torchvision"), ("book_vgg16", ["--labels", "ants,bees"], "state_dict")],
)
def test_classifier_to_project_answers_identically(
    tiny: dict[str, Path],
    tmp_path: Path,
    china: Image.Image,
    capsys: pytest.CaptureFixture[str],
    name: str,
    extra: list[str],
    fmt: str,
) -> None:
    assert _run(capsys, tiny[name], tmp_path / "p.pth", "--to", "project", *extra)[0] == 0
    labels = ("ants", "bees") if extra else None
    a = load_model(ModelSpec("a", "classify", "vgg16", fmt, tiny[name], labels=labels))
    b = load_model(ModelSpec("b", "classify", "vgg16", "project", tmp_path / "p.pth"))
    assert a.info.labels == b.info.labels and a.info.input_size == b.info.input_size
    x = a.preprocess(china)[None]
    assert torch.equal(x, b.preprocess(china)[None])  # the preset travels with the file
    ra, rb = a.predict(x, top_k=5)[0], b.predict(x, top_k=5)[0]  # type: ignore[call-arg]
    assert torch.equal(ra.scores, rb.scores) and torch.equal(ra.class_ids, rb.class_ids)
    assert _run(capsys, tmp_path / "p.pth", tmp_path / "back.pth", "--to", "torchvision")[0] == 0
    original, back = _load(tiny[name]), _load(tmp_path / "back.pth")
    assert list(original) == list(back) and all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("book_ssd300", ["--to", "project"], "pass its 20 labels (background excluded"),
        ("book_ssd300", ["--to", "project", "--labels", "a,b"], "--labels gives 2 labels; give 20"),
        ("book_ssd300", ["--to", "torchvision", "--from", "torchvision"], "use --from 'ssd.pytorch'"),
        ("book_ssd300", ["--to", "torchvision", "--arch", "ssd512"], "holds a ssd300, not the --arch ssd512"),
        (
            "book_ssd300",
            ["--to", "torchvision", "--task", "classify"],
            "a detect model, but task is 'classify'",
        ),
        ("book_ssd512", ["--to", "torchvision"], "torchvision's layout exists for SSD300 only"),
        ("tv_vgg16", ["--to", "ssd.pytorch"], "is a VGG16 classifier, not an SSD"),
        ("pickled_model", ["--to", "project"], "holds a pickled Python object"),
        ("truncated_zip", ["--to", "torchvision"], "truncated or corrupt"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tiny: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    argv: list[str],
    message: str,
) -> None:
    code, out, err = _run(capsys, tiny[name], tmp_path / "out.pth", *argv)
    assert code == 2 and out == "" and err.startswith("models.convert: error: ") and message in err
    assert not (tmp_path / "out.pth").exists()


def test_missing_source_and_existing_destination(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, tmp_path / "nope.pth", tmp_path / "o.pth", "--to", "project")
    assert code == 2 and "weights file not found" in err
    (tmp_path / "o.pth").write_bytes(b"keep me")
    code, _, err = _run(capsys, tiny["tv_ssd300"], tmp_path / "o.pth", "--to", "ssd.pytorch")
    assert code == 2 and "--force" in err and (tmp_path / "o.pth").read_bytes() == b"keep me"
    assert _run(capsys, tiny["tv_ssd300"], tmp_path / "o.pth", "--to", "ssd.pytorch", "--force")[0] == 0


def test_command_line_entry_point(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tiny["book_ssd300"]), str(tmp_path / "tv.pth"), "--to", "torchvision"]
    ok = subprocess.run(
        [sys.executable, "-m", "models.convert", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert f"read {tiny['book_ssd300']}" in ok.stdout and "71 tensors" in ok.stdout
    with pytest.raises(SystemExit) as info:  # argparse's own usage errors exit 2 as well
        main([*argv[:2], "--to", "yaml"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_factory_round_trip_of_key_names() -> None:
    """The factory's own renaming (written from the reference) agrees with models.ssd's."""
    from models.ssd import book_to_torchvision

    sd = cf.book_ssd_state_dict(21, 1 / 16)
    assert list(book_to_torchvision(sd)) == [cf.book_to_torchvision_keys(k) for k in sd]
