"""Detection and classification scores: VOC07 / VOC12 AP on cases worked out by hand here, COCO
against faster-coco-eval called directly, and ``python -m train evaluate`` on the demo models
against a devkit evaluation written here as plain loops."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import ClassifyOutput, DetectOutput, DetectParams, ModelSpec, load_model
from tests.train.conftest import command
from train.__main__ import main
from train.errors import TrainError
from train.evaluate import evaluate_checkpoint, write_report
from train.metrics import ClassificationResults, coco_score, voc_score
from train.synth import CLASSES, write_folders, write_voc
from train.voc import VOCTruth, read_voc

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "weights" / "demo"


def found(boxes: list[list[float]], scores: list[float], ids: list[int]) -> DetectOutput:
    """Detections as the model gives them: 0-based pixel boxes."""
    return DetectOutput(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores),
        torch.tensor(ids, dtype=torch.long),
    )


def truth(boxes: list[list[float]], labels: list[int], difficult: list[bool]) -> VOCTruth:
    """Ground truths as an annotation file gives them: 1-based pixel indices, max inclusive."""
    return VOCTruth(
        "x",
        200,
        200,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


LABELS = ["a", "b", "c", "d", "e"]
A, B, C, D, E = range(5)
#: image 0: a (A1), a difficult (A2), e difficult; image 1: a (A3), a (A4), b, c
TRUTHS = [
    truth([[1, 1, 10, 10], [21, 21, 30, 30], [41, 41, 50, 50]], [A, A, E], [False, True, True]),
    truth(
        [[1, 1, 10, 10], [31, 31, 40, 40], [50, 50, 80, 80], [100, 100, 120, 120]], [A, A, B, C], [False] * 4
    ),
]
#: detections (0-based: the file's coordinates minus 1)
FOUND = [
    found(
        [
            [0, 0, 9, 9],
            [0, 0, 9, 9],
            [20, 20, 29, 29],
            [150, 150, 160, 160],
            [60, 60, 70, 70],
            [40, 40, 49, 49],
        ],
        [0.9, 0.8, 0.7, 0.5, 0.95, 0.9],
        [A, A, A, B, D, E],
    ),
    found(
        [[150, 150, 170, 170], [0, 0, 9, 9], [30, 30, 39, 39], [49, 49, 79, 79]],
        [0.85, 0.6, 0.3, 0.9],
        [A, A, A, B],
    ),
]


def test_voc_average_precision_worked_out_by_hand() -> None:
    # class a, 3 counted objects (A2 is difficult), detections by score over both images:
    #   0.9 A1 TP | 0.85 nothing FP | 0.8 A1 again FP (a duplicate) | 0.7 A2 difficult: neither |
    #   0.6 A3 TP | 0.3 A4 TP
    #   recall 1/3, 1/3, 1/3, 1/3, 2/3, 1; precision 1, 1/2, 1/3, 1/3, 1/2, 3/5
    #   VOC07: levels 0, .1, .2, .3 -> 1; .4, .5, .6 -> 3/5; .7 .. 1 -> 3/5: (4 + 7 * 0.6) / 11
    #   VOC12: envelope 1 up to recall 1/3, then 3/5: 1/3 + (2/3) * 0.6
    # class b: its 0.9 detection in image 1 ranks before the 0.5 miss in image 0: AP 1 both ways
    # class c: an object and no detection: AP 0; d: a detection and no object; e: only a difficult
    # object: d and e have no AP and stay out of the mean
    ap07 = (4 + 7 * 0.6) / 11
    ap12 = 1 / 3 + 2 / 3 * 0.6
    v07 = voc_score(FOUND, TRUTHS, LABELS, "voc07")
    v12 = voc_score(FOUND, TRUTHS, LABELS, "voc12")
    assert v07.per_class == pytest.approx({"a": ap07, "b": 1.0, "c": 0.0, "d": None, "e": None})
    assert v12.per_class == pytest.approx({"a": ap12, "b": 1.0, "c": 0.0, "d": None, "e": None})
    assert v07.map == pytest.approx((ap07 + 1.0) / 3)
    assert v12.map == pytest.approx((ap12 + 1.0) / 3)
    assert (v07.images, v07.objects, v07.difficult) == (2, 7, 2)
    assert v07.as_json() == {
        "metric": "voc07",
        "map": v07.map,
        "per_class": v07.per_class,
        "images": 2,
        "objects": 7,
        "difficult": 2,
    }


def test_voc_iou_counts_pixels_and_must_exceed_one_half() -> None:
    # a 2 x 2-pixel object (1..2) and a detection at 0-based [0, 0, 1, 2], written 1-based as
    # [1, 1, 2, 3]: 2 x 3 pixels, 4 shared -> IoU 4/6, a match (in continuous units it would be 1/2)
    # a 10 x 10 object and a detection over its top half (10 x 5 pixels): IoU exactly 1/2, no match
    truths = [truth([[1, 1, 2, 2]], [0], [False]), truth([[1, 1, 10, 10]], [0], [False])]
    dets = [found([[0, 0, 1, 2]], [0.9], [0]), found([[0, 0, 9, 4]], [0.8], [0])]
    # recall 1/2, 1/2; precision 1, 1/2
    assert voc_score(dets, truths, ["a"], "voc12").map == pytest.approx(0.5)
    assert voc_score(dets, truths, ["a"], "voc07").map == pytest.approx(6 / 11)


def test_no_counted_object_anywhere_gives_minus_one() -> None:
    score = voc_score(
        [found([[0, 0, 9, 9]], [0.9], [0])], [truth([[1, 1, 10, 10]], [0], [True])], ["a"], "voc07"
    )
    assert score.map == -1.0 and score.per_class == {"a": None}


def _coco_reference(dets: list[DetectOutput], truths: list[VOCTruth], labels: list[str]) -> dict[str, float]:
    """faster-coco-eval itself, on COCO-format dicts built here (xywh; difficult as crowd)."""
    from faster_coco_eval import COCO, COCOeval_faster

    images, annotations, results = [], [], []
    for i, (d, t) in enumerate(zip(dets, truths, strict=True)):
        images.append({"id": i, "width": t.width, "height": t.height})
        for box, label, hard in zip(t.boxes - 1, t.labels, t.difficult, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(label),
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": int(hard),
                }
            )
        for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.class_ids.tolist(), strict=True):
            results.append(
                {
                    "image_id": i,
                    "category_id": label,
                    "score": score,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    gt = COCO(
        {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": n} for k, n in enumerate(labels)],
        }
    )
    evaluation = COCOeval_faster(gt, gt.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = evaluation.stats
    reference = {"map": stats[0], "ap50": stats[1], "ap75": stats[2], "ar100": stats[8]}
    precision = evaluation.eval["precision"]  # (IoU, recall, class, area, max dets)
    for k, label in enumerate(labels):
        values = precision[:, :, k, 0, -1]
        reference[label] = float(values[values > -1].mean()) if (values > -1).any() else -1.0
    return reference


def test_coco_numbers_agree_with_faster_coco_eval_on_a_generated_set() -> None:
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    dets, truths = [], []
    for _ in range(12):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(1, 150, size=(n, 2))
        boxes = np.concatenate((xy, xy + rng.uniform(8, 60, size=(n, 2))), axis=1).round()
        classes = rng.integers(0, 3, size=n)
        truths.append(truth(boxes.tolist(), classes.tolist(), (rng.random(n) < 0.15).tolist()))
        # the objects found again with jitter (some with the wrong class), plus a few stray boxes
        jitter = (boxes - 1 + rng.normal(0, 4, size=boxes.shape)).clip(0, 250)
        stray = rng.uniform(0, 200, size=(2, 2))
        pred = np.concatenate((jitter, np.concatenate((stray, stray + 30), axis=1)))
        pred_classes = np.concatenate(
            (np.where(rng.random(n) < 0.2, (classes + 1) % 3, classes), rng.integers(0, 3, size=2))
        )
        scores = rng.uniform(0.01, 1, size=len(pred))
        dets.append(found(pred.tolist(), scores.tolist(), pred_classes.tolist()))
    ours = coco_score(dets, truths, labels)
    reference = _coco_reference(dets, truths, labels)
    assert 0.1 < reference["map"] < 0.9  # a set with hits and misses, not a trivial one
    assert ours.map == pytest.approx(reference["map"], abs=1e-6)
    for key in ("ap50", "ap75", "ar100"):
        assert ours.extra[key] == pytest.approx(reference[key], abs=1e-6)
    for label in labels:
        assert ours.per_class[label] == pytest.approx(reference[label], abs=1e-6)


# ------------------------------------------------------------- python -m train evaluate on the demo models


def _devkit_voc_eval(
    data: Path, split: str, labels: list[str]
) -> tuple[dict[str, float], dict[str, float], list[DetectOutput]]:
    """The devkit's evaluation written out as plain loops, on the demo detector's detections of the
    protocol (score >= 0.01, at most 200 an image, 1-based boxes): (VOC07 AP, VOC12 AP) per class,
    and the detections."""
    weights = DEMO / "shapes-ssd300-w16.pth"
    detector = load_model(
        ModelSpec(name="demo", task="detect", arch="ssd300", format="project", weights=weights)
    )
    image_ids = (data / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    records, lines = {}, {name: [] for name in labels}  # the devkit's annotations and results files
    images = []
    for image_id in image_ids:
        objects = []
        for obj in ET.parse(data / "Annotations" / f"{image_id}.xml").findall("object"):
            box = obj.find("bndbox")
            assert box is not None
            objects.append(
                {
                    "name": obj.findtext("name"),
                    "difficult": int(obj.findtext("difficult") or 0),
                    "bbox": [int(box.findtext(t) or 0) for t in ("xmin", "ymin", "xmax", "ymax")],
                }
            )
        records[image_id] = objects
        with Image.open(data / "JPEGImages" / f"{image_id}.jpg") as file:
            images.append(file.convert("RGB"))
    batch = torch.stack([detector.preprocess(image) for image in images])
    params = [DetectParams(score_threshold=0.01, max_detections=200)] * len(images)
    outputs = detector.predict(batch, [image.size for image in images], params)
    for image_id, out in zip(image_ids, outputs, strict=True):
        for box, score, cls in zip(
            out.boxes.tolist(), out.scores.tolist(), out.class_ids.tolist(), strict=True
        ):
            lines[labels[cls]].append((image_id, score, box[0] + 1, box[1] + 1, box[2] + 1, box[3] + 1))
    aps: dict[bool, dict[str, float]] = {True: {}, False: {}}
    for name in labels:
        gt = {i: [o for o in records[i] if o["name"] == name] for i in image_ids}
        used = {i: [False] * len(gt[i]) for i in image_ids}
        npos = sum(1 for i in image_ids for o in gt[i] if not o["difficult"])
        dets = sorted(lines[name], key=lambda d: -d[1])  # stable, as MATLAB's sort
        tp, fp = [], []
        for image_id, _, *bb in dets:
            ovmax, jmax = -1.0, -1
            for j, o in enumerate(gt[image_id]):
                g = o["bbox"]
                iw = min(g[2], bb[2]) - max(g[0], bb[0]) + 1
                ih = min(g[3], bb[3]) - max(g[1], bb[1]) + 1
                if iw > 0 and ih > 0:
                    union = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
                    ov = iw * ih / (union - iw * ih)
                    if ov > ovmax:
                        ovmax, jmax = ov, j
            if ovmax > 0.5:
                if gt[image_id][jmax]["difficult"]:
                    tp.append(0)
                    fp.append(0)
                elif not used[image_id][jmax]:
                    used[image_id][jmax] = True
                    tp.append(1)
                    fp.append(0)
                else:
                    tp.append(0)
                    fp.append(1)
            else:
                tp.append(0)
                fp.append(1)
        if npos == 0:
            continue
        rec, prec, ctp, cfp = [], [], 0, 0
        for t, f in zip(tp, fp, strict=True):
            ctp, cfp = ctp + t, cfp + f
            rec.append(ctp / npos)
            prec.append(ctp / max(ctp + cfp, sys.float_info.epsilon))
        ap = 0.0
        for k in range(11):  # the Python devkit's np.arange(0, 1.1, 0.1): k * 0.1
            ap += max([p for r, p in zip(rec, prec, strict=True) if r >= k * 0.1], default=0.0) / 11
        aps[True][name] = ap
        mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
        for k in range(len(mpre) - 2, -1, -1):
            mpre[k] = max(mpre[k], mpre[k + 1])
        aps[False][name] = sum(
            (mrec[k + 1] - mrec[k]) * mpre[k + 1] for k in range(len(mrec) - 1) if mrec[k + 1] != mrec[k]
        )
    return aps[True], aps[False], outputs


@pytest.fixture(scope="module")
def held_out_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 held-out demo-shape images in a VOC folder, with some objects marked difficult."""
    data = write_voc(tmp_path_factory.mktemp("held-out-voc"), train=0, val=30, seed=1, size=300)
    text = "".join(p.read_text() for p in (data / "Annotations").glob("*.xml"))
    assert text.count("<difficult>1</difficult>") >= 2
    return data


def test_evaluate_voc07_agrees_with_the_devkit_rules(
    held_out_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.json"
    weights = DEMO / "shapes-ssd300-w16.pth"
    argv = command(
        "evaluate --weights", weights, "--data", held_out_voc, "--metric voc07 --no-progress --json", out
    )
    assert main(argv) == 0
    written = json.loads(out.read_text())
    stdout, stderr = capsys.readouterr()
    assert json.loads(stdout) == written
    expected, expected12, outputs = _devkit_voc_eval(held_out_voc, "val", list(CLASSES))
    assert set(written) >= {"metric", "map", "per_class", "images", "objects", "difficult"}
    assert written["metric"] == "voc07" and written["images"] == 30 and written["difficult"] >= 2
    assert written["per_class"] == pytest.approx(expected, abs=1e-9)
    assert written["map"] == pytest.approx(sum(expected.values()) / len(expected), abs=1e-9)
    assert 0.5 < written["map"] < 1.0
    assert f"VOC07 11-point mAP@0.5 = {written['map']:.4f} on 30 images" in stderr
    assert "VOC07 11-point AP@0.5 star = " in stderr
    # VOC12 on the same detections, and voc07 as the default for a VOC folder
    ids = (held_out_voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    truths = [read_voc(held_out_voc / "Annotations" / f"{i}.xml", CLASSES) for i in ids]
    assert voc_score(outputs, truths, CLASSES, "voc12").per_class == pytest.approx(expected12, abs=1e-9)
    assert expected12 != pytest.approx(expected, abs=1e-3)
    default = evaluate_checkpoint(DEMO / "shapes-ssd300-w16.pth", held_out_voc, show=False)
    assert default["metric"] == "voc07" and default["map"] == written["map"]


def test_classifier_report_has_top5_per_class_and_confusion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_folders(tmp_path / "cls", train=0, val=12, seed=5, size=96)
    out = tmp_path / "cls.json"
    weights = DEMO / "shapes-vgg16-bn-w16.pth"
    assert main(command("evaluate --no-progress --weights", weights, "--data", data, "--json", out)) == 0
    report = json.loads(out.read_text())
    assert "top-1 accuracy = " in capsys.readouterr().err
    classifier = load_model(
        ModelSpec(name="demo", task="classify", arch="vgg16_bn", format="project", weights=weights)
    )
    labels = classifier.info.labels
    expected = np.zeros((4, 4), dtype=int)
    for path in sorted((data / "val").glob("*/*.jpg")):
        with Image.open(path) as file:
            top = classifier.predict(classifier.preprocess(file.convert("RGB"))[None], top_k=1)[0]
        expected[labels.index(path.parent.name), int(top.class_ids[0])] += 1
    assert report["confusion"] == {"labels": labels, "matrix": expected.tolist()}
    assert report["top1"] == pytest.approx(np.trace(expected) / 12)
    assert report["top5"] == 1.0  # four classes: the true one is always among the top five
    assert report["per_class"] == pytest.approx(
        {c: expected[labels.index(c), labels.index(c)] / expected[labels.index(c)].sum() for c in labels}
    )
    png = tmp_path / "cls-confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TrainError, match="scores detectors"):
        evaluate_checkpoint(weights, data, show=False, metric="voc07")


def test_without_matplotlib_the_report_is_json_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    report = {"task": "classify", "confusion": {"labels": ["a", "b"], "matrix": [[1, 0], [0, 1]]}}
    assert write_report(report, tmp_path / "r.json") == [tmp_path / "r.json"]
    assert not (tmp_path / "r-confusion.png").exists()


def test_top5_counts_a_label_ranked_fifth_and_not_sixth() -> None:
    results = ClassificationResults(list("abcdef"))
    ranked = torch.tensor([5, 4, 3, 2, 1])  # f, e, d, c, b: "a" is sixth
    results.add(ClassifyOutput(scores=torch.ones(5), class_ids=ranked), 1)  # b: fifth, a top-5 hit
    results.add(ClassifyOutput(scores=torch.ones(5), class_ids=ranked), 0)  # a: a miss
    results.add(ClassifyOutput(scores=torch.ones(5), class_ids=ranked), 5)  # f: top-1
    report = results.as_json(["a", "b", "f"])
    assert report["top1"] == pytest.approx(1 / 3) and report["top5"] == pytest.approx(2 / 3)
    assert report["per_class"] == {"a": 0.0, "b": 0.0, "f": 1.0}
    assert report["confusion"]["matrix"][1][5] == 1 and report["confusion"]["matrix"][0][5] == 1
