"""app.models_file.read_models_file: the TOML format, checks, and messages naming file and entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models_file import ModelsFileError, read_models_file

SHA = "ab" * 32

GOOD = f"""
[[models]]
name = "vgg16-imagenet"
task = "classify"
arch = "vgg16"
format = "torchvision"
weights = "vgg16.pth"
top_k = 3
resize = 256
crop = 224

[[models]]
name = "ssd-voc"
task = "detect"
arch = "ssd300"
format = "ssd.pytorch"
weights = "sub/ssd.pth"
labels_file = "voc.txt"
sha256 = "{SHA.upper()}"
default = true
score_threshold = 0.3
iou_threshold = 0.5
max_detections = 200

[[models]]
name = "ssd-coco"
task = "detect"
arch = "ssd300"
format = "torchvision"
weights = "/abs/ssd_coco.pth"
labels = ["a", "b"]
"""


def write(tmp_path: Path, text: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ModelsFileError) as err:
        read_models_file(path)
    message = str(err.value)
    assert str(path) in message, "every message names the file"
    return message


def entry(**fields: object) -> str:
    base: dict[str, object] = {
        "name": "m",
        "task": "classify",
        "arch": "vgg16",
        "format": "torchvision",
        "weights": "w.pth",
    }
    base.update(fields)
    lines = []
    for key, value in base.items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    return "[[models]]\n" + "\n".join(lines) + "\n"


def test_good_file(tmp_path: Path) -> None:
    (tmp_path / "voc.txt").write_text("aeroplane\nbicycle\n\n")
    result = read_models_file(write(tmp_path, GOOD))
    names = [s.name for s in result.specs]
    assert names == ["vgg16-imagenet", "ssd-voc", "ssd-coco"]
    vgg, voc, coco = result.specs
    assert vgg.weights == tmp_path / "vgg16.pth"  # relative to the file's folder
    assert voc.weights == tmp_path / "sub" / "ssd.pth"
    assert coco.weights == Path("/abs/ssd_coco.pth")
    assert vgg.labels is None and voc.labels == ("aeroplane", "bicycle") and coco.labels == ("a", "b")
    assert voc.sha256 == SHA  # lower-cased
    assert (vgg.top_k, vgg.resize, vgg.crop) == (3, 256, 224)
    assert (voc.score_threshold, voc.iou_threshold, voc.max_detections) == (0.3, 0.5, 200)
    assert result.defaults == {"classify": "vgg16-imagenet", "detect": "ssd-voc"}


def test_first_model_of_a_task_is_its_default(tmp_path: Path) -> None:
    text = entry(name="a", task="detect", arch="ssd300") + entry(name="b", task="detect", arch="ssd512")
    assert read_models_file(write(tmp_path, text)).defaults == {"detect": "a"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (entry() + entry(), "'m' is used twice"),
        (entry(name="a", default=True) + entry(name="b", default=True), "second default classify"),
        (entry(name="Bad Name"), "name"),
        (entry(name="-x"), "name"),
        (entry(task="segment"), "task"),
        (entry(arch="resnet50"), "unknown arch 'resnet50'"),
        (entry(format="onnx"), "unknown format 'onnx'"),
        (entry(arch="ssd300"), "'ssd300' is a detect model"),
        (entry(labels=["a"], labels_file="x.txt"), "not both"),
        (entry(labels=[]), "labels"),
        (entry(sha256="abc"), "sha256"),
        (entry(top_k=0), "top_k"),
        (entry(top_k=1001), "top_k"),
        (entry(score_threshold=0.5), "score_threshold do(es) not apply to a classify model"),
        (entry(task="detect", arch="ssd300", top_k=5), "top_k do(es) not apply to a detect model"),
        (entry(task="detect", arch="ssd300", score_threshold=1.5), "score_threshold"),
        (entry(task="detect", arch="ssd300", iou_threshold=0), "iou_threshold"),
        (entry(task="detect", arch="ssd300", max_detections=0), "max_detections"),
        (entry(weights=None), "weights"),
        (entry(colour="red"), "colour: unknown key"),
        (entry(labels_file="missing.txt"), "cannot read labels_file"),
        ("[[models]\nname=", "not valid TOML"),
        ("", "nothing to serve"),
        ('title = "x"\n', "title: unknown key"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, words: str) -> None:
    message = error_of(tmp_path, text)
    assert words in message
    if text.startswith("[[models]]") and "used twice" not in words and "second default" not in words:
        assert "models[0]" in message  # which entry


def test_the_entry_is_named_by_index_and_name(tmp_path: Path) -> None:
    message = error_of(tmp_path, entry(name="ok") + entry(name="second", crop=-1))
    assert "models[1] ('second')" in message and "crop" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match="models file not found"):
        read_models_file(tmp_path / "nope.toml")


def test_labels_file_with_a_blank_line_inside(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("a\n\nb\n")
    assert "blank line at line 2" in error_of(tmp_path, entry(labels_file="l.txt"))
