"""Checkpoints from ``python -m train`` are served by the app as they are, and the committed demo
models (the default ``weights/models.toml``) find shapes in images these tests draw themselves."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from app.main import create_app
from tests.app.harness import running, settings_for
from train.synth import CLASSES

REPO = Path(__file__).resolve().parents[2]
DEMO_MODELS = REPO / "weights" / "models.toml"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _iou(a: dict[str, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a["x2"], b[2]) - max(a["x1"], b[0]))
    iy = max(0.0, min(a["y2"], b[3]) - max(a["y1"], b[1]))
    inter = ix * iy
    return inter / ((a["x2"] - a["x1"]) * (a["y2"] - a["y1"]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _scene() -> tuple[Image.Image, list[tuple[str, tuple[float, float, float, float]]]]:
    """A 360 x 280 picture: a soft two-tone background, a red ellipse, a blue rectangle and a
    yellow triangle, drawn here with PIL (not with train.synth); boxes are the shapes' extents."""
    image = Image.new("RGB", (360, 280), (70, 110, 90))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 140, 360, 280), fill=(95, 125, 105))
    shapes = [
        ("ellipse", (30.0, 30.0, 150.0, 120.0)),
        ("rectangle", (200.0, 40.0, 320.0, 130.0)),
        ("triangle", (120.0, 150.0, 250.0, 260.0)),
    ]
    draw.ellipse(shapes[0][1], fill=(220, 40, 40))
    draw.rectangle(shapes[1][1], fill=(40, 70, 220))
    x1, y1, x2, y2 = shapes[2][1]
    draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=(235, 210, 40))
    return image, shapes


async def test_checkpoints_written_by_training_are_served(
    trained_classifier: Path, trained_detector: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "trained-vgg"\ntask = "classify"\narch = "vgg16_bn"\nformat = "project"\n'
        f'weights = "{trained_classifier / "best.pth"}"\n\n'
        f'[[models]]\nname = "trained-ssd"\ntask = "detect"\narch = "ssd300"\nformat = "project"\n'
        f'weights = "{trained_detector / "best.pth"}"\nscore_threshold = 0.0\n'
    )
    image, _ = _scene()
    app = create_app(settings_for(models_file=models))
    async with running(app) as client:
        listed = (await client.get("/v1/models")).json()
        assert {m["name"] for m in listed["models"]} == {"trained-vgg", "trained-ssd"}
        info = (await client.get("/v1/models/trained-ssd")).json()
        assert info["labels"] == list(CLASSES) and info["format"] == "project"
        classified = await client.post("/v1/classify", files={"file": ("a.png", _png(image), "image/png")})
        assert classified.status_code == 200, classified.text
        predictions = classified.json()["results"][0]["predictions"]
        assert {p["label"] for p in predictions} == set(CLASSES)  # top 5 of 4 classes: all of them
        detected = await client.post(
            "/v1/detect?max_detections=5", files={"file": ("a.png", _png(image), "image/png")}
        )
        assert detected.status_code == 200, detected.text
        detections = detected.json()["results"][0]["detections"]
        assert len(detections) == 5  # an untrained model is unsure of everything; threshold 0 keeps them
        assert all(d["label"] in CLASSES for d in detections)


def test_default_models_file_serves_the_committed_demo_checkpoints() -> None:
    """weights/models.toml pins each demo file's SHA-256, and the demo README's table names the same."""
    import hashlib
    import tomllib

    entries = tomllib.loads(DEMO_MODELS.read_text())["models"]
    assert {(m["task"], m["format"]) for m in entries} == {("classify", "project"), ("detect", "project")}
    readme = (REPO / "weights" / "demo" / "README.md").read_text()
    for entry in entries:
        path = DEMO_MODELS.parent / entry["weights"]
        assert path.parent.name == "demo" and path.stat().st_size < 5_000_000  # small enough for git
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["sha256"] == digest, f"{path.name}: models.toml pins another file"
        assert digest in readme


async def test_demo_models_find_the_shapes_drawn_here() -> None:
    """The default models file, served as the README's start command serves it: the detector finds
    each of the three shapes this test draws (right label, IoU >= 0.5) and the classifier names a
    picture holding one shape."""
    image, shapes = _scene()
    app = create_app(settings_for(models_file=DEMO_MODELS))
    async with running(app) as client:
        detected = await client.post(
            "/v1/detect?score_threshold=0.3", files={"file": ("scene.png", _png(image), "image/png")}
        )
        assert detected.status_code == 200, detected.text
        body = detected.json()
        assert body["model"] == "shapes-ssd300"
        found = body["results"][0]["detections"]
        for label, box in shapes:
            best = max((_iou(d["box"], box) for d in found if d["label"] == label), default=0.0)
            assert best >= 0.5, f"{label} at {box} not found: {found}"
        for label, box in shapes:  # one shape alone on the background, as the classifier was trained
            x1, y1, x2, y2 = box
            crop = image.crop((int(x1) - 20, int(y1) - 20, int(x2) + 20, int(y2) + 20))
            classified = await client.post(
                "/v1/classify?top_k=1", files={"file": ("one.png", _png(crop), "image/png")}
            )
            assert classified.status_code == 200, classified.text
            assert classified.json()["results"][0]["predictions"][0]["label"] == label


def test_evaluate_int8_reports_accuracy_and_agreement_with_fp32(tmp_path: Path) -> None:
    """``python -m train evaluate --precision int8`` on the demo classifier: held-out top-1 and the
    agreement with fp32 on the same images; int8 without calibration images is refused."""
    import pytest

    from train.errors import TrainError
    from train.evaluate import evaluate_checkpoint
    from train.synth import write_folders

    data = write_folders(tmp_path / "cls", train=0, val=24, seed=5, size=96)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i, path in enumerate(sorted((data / "val").glob("*/*"))[:12]):
        (calibration / f"{i}{path.suffix}").write_bytes(path.read_bytes())
    weights = DEMO_MODELS.parent / "demo" / "shapes-vgg16-bn-w16.pth"
    fp32 = evaluate_checkpoint(weights, data, show=False)
    int8 = evaluate_checkpoint(weights, data, show=False, precision="int8", calibration=calibration)
    assert "agreement" not in fp32 and fp32["top1"] >= 0.8
    assert int8["precision"] == "int8" and int8["images"] == 24
    agreement = int8["agreement"]
    assert agreement["images"] == 24 and 0.8 <= agreement["top1_agreement"] <= 1.0
    assert abs(int8["top1"] - fp32["top1"]) <= 1 - agreement["top1_agreement"] + 1e-9
    assert 0.0 < agreement["score_diff_max"] < 1.0  # int8 changes the scores, a little
    with pytest.raises(TrainError, match="needs --calibration"):
        evaluate_checkpoint(weights, data, show=False, precision="int8")
