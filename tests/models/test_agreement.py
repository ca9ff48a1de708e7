"""models.agreement: the IoU >= 0.9 recall of the agreement check at start, and apply_with_report, the
one path by which int8 and another runtime report how closely they answer like torch fp32."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from models import Classifier, DetectOutput, ModelConfigError, ModelSpec, load_model
from models.agreement import HIGH_IOU, agreement_report, apply_with_report, high_iou_recall
from tests import checkpoint_factory as cf


def _out(boxes: torch.Tensor, scores: list[float], classes: list[int]) -> DetectOutput:
    return DetectOutput(boxes, torch.tensor(scores), torch.tensor(classes))


BOX = torch.tensor([[10.0, 10.0, 110.0, 110.0]])
SHIFTED = BOX + torch.tensor([[5.0, 0.0, 5.0, 0.0]])  # IoU 95/105 = 0.905
FAR = BOX + torch.tensor([[20.0, 0.0, 20.0, 0.0]])  # IoU 80/120 = 0.667
#: two confident boxes on the first image, one below the 0.5 score threshold on the second
REFERENCE = [_out(torch.cat([BOX, BOX + 200]), [0.9, 0.8], [1, 2]), _out(BOX, [0.3], [1])]


def test_high_iou_recall_counts_same_class_overlaps_above_the_bar() -> None:
    assert HIGH_IOU == 0.9
    second = _out(BOX, [0.3], [1])
    # a shifted box at IoU 0.905 still counts, whatever its score
    shifted = [_out(torch.cat([SHIFTED, BOX + 200]), [0.1, 0.9], [1, 2]), second]
    assert high_iou_recall(REFERENCE, shifted) == 1.0
    far = [_out(torch.cat([FAR, BOX + 200]), [0.9, 0.9], [1, 2]), second]
    assert high_iou_recall(REFERENCE, far) == 0.5
    swapped = [_out(torch.cat([SHIFTED, BOX + 200]), [0.9, 0.9], [2, 1]), second]  # the classes swapped
    assert high_iou_recall(REFERENCE, swapped) == 0.0
    stricter = [_out(torch.cat([SHIFTED, BOX]), [0.9, 0.9], [1, 2]), _out(BOX, [0.9], [1])]
    assert high_iou_recall(REFERENCE, stricter, iou=0.95) == 0.0
    assert high_iou_recall([second], [second]) is None  # nothing above the score threshold
    with pytest.raises(ValueError, match="one output per image"):
        high_iou_recall(REFERENCE, REFERENCE[:1])


def test_the_detector_report_has_the_high_iou_recall() -> None:
    far = [_out(torch.cat([FAR, BOX + 200]), [0.9, 0.9], [1, 2]), _out(BOX, [0.3], [1])]
    report = agreement_report(REFERENCE, far)
    # both reference boxes are matched at IoU >= 0.5, but only one is the same box at IoU >= 0.9
    assert report["recall"] == 1.0 and report["high_iou_recall"] == 0.5
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert "high_iou_recall" not in agreement_report(logits, logits)


@pytest.fixture(scope="module")
def classifier_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    weights = cf.write_torchvision_vgg16(tmp_path_factory.mktemp("agreement") / "vgg16.pth", width=1 / 16)
    return ModelSpec(name="vgg", task="classify", arch="vgg16", format="torchvision", weights=weights)


def _halved(predictor: Classifier) -> Classifier:
    """A change that scales the logits by 1/2: the top-1 class stays, the softmax scores move."""
    network = predictor.model

    class Half(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return network(x) / 2  # type: ignore[no-any-return]  # nn.Module's call is untyped

    predictor.model = Half()
    return predictor


def test_apply_with_report_compares_the_changed_predictor_with_the_one_it_was(
    classifier_spec: ModelSpec, china: Image.Image, flower: Image.Image
) -> None:
    clf = load_model(classifier_spec)
    assert isinstance(clf, Classifier)
    original = clf.model
    images = [china, flower, china.crop((0, 0, 300, 200))]
    changed, report = apply_with_report(clf, images, _halved, report_images=2)
    assert changed is clf and clf.model is not original
    assert report["images"] == 2  # report_images of the images
    assert report["top1_agreement"] == 1.0  # halving logits keeps the arg-max ...
    assert report["score_diff_max"] > 0  # ... and moves the scores
    unchanged, same = apply_with_report(load_model(classifier_spec), images, lambda p: p)
    assert same["images"] == 3 and same["score_diff_max"] == 0.0
    with pytest.raises(ModelConfigError, match="at least one image"):
        apply_with_report(unchanged, [], lambda p: p)
