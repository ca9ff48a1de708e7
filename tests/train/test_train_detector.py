"""python -m train detector: VOC reading, the data set, the base, a few steps, the command's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from models import ModelSpec, load_model
from models.anchors import default_boxes
from models.ssd import SSD, SSD300_VOC
from train.detector import build_detector
from train.errors import TrainError
from train.multibox import MultiBoxLoss
from train.synth import CLASSES
from train.voc import VOCDetection, collate, read_annotation

TINY = 1 / 16

XML = """<annotation><size><width>200</width><height>100</height><depth>3</depth></size>
<object><name> Star </name><difficult>0</difficult>
  <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>61</xmax><ymax>81</ymax></bndbox></object>
<object><name>ellipse</name><difficult>1</difficult>
  <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>50</ymax></bndbox></object>
<object><name>triangle</name>
  <bndbox><xmin>101</xmin><ymin>1</ymin><xmax>200</xmax><ymax>100</ymax></bndbox></object>
</annotation>"""


def test_read_annotation_drops_difficult_objects_and_reads_boxes_as_the_book(tmp_path: Path) -> None:
    path = tmp_path / "a.xml"
    path.write_text(XML)
    ann = read_annotation(path, CLASSES)
    assert (ann.width, ann.height) == (200, 100)
    # names are lower-cased and stripped
    assert ann.labels.tolist() == [CLASSES.index("star"), CLASSES.index("triangle")]
    assert ann.boxes.tolist() == [[10, 20, 60, 80], [100, 0, 199, 99]]  # coord - 1
    assert len(read_annotation(path, CLASSES, keep_difficult=True).boxes) == 3
    with pytest.raises(TrainError, match="'star' is not in the labels"):
        read_annotation(path, ["ellipse", "triangle"])


def test_synthetic_voc_boxes_survive_the_round_trip(voc_data: Path) -> None:
    from train.synth import draw_detection_image

    image, objects = draw_detection_image(3, "train", 0, size=120, max_objects=3)
    ann = read_annotation(voc_data / "Annotations" / "train_00000.xml", CLASSES, keep_difficult=True)
    assert (ann.width, ann.height) == image.size
    for obj, box, label in zip(objects, ann.boxes, ann.labels, strict=True):
        assert CLASSES[label] == obj.name
        assert box.tolist() == pytest.approx(obj.box, abs=1.01)  # whole pixels, the book's (coord - 1)


def test_dataset_items_and_seeded_augmentation(voc_data: Path) -> None:
    plain = VOCDetection(voc_data, "val", CLASSES, 300)
    image, target, size = plain[0]
    assert image.shape == (3, 300, 300) and target.shape[1] == 5 and len(target) >= 1
    assert (target[:, :4] >= 0).all() and (target[:, :4] <= 1).all()
    ann = plain.annotations[0]
    assert size == (ann.width, ann.height)
    torch.testing.assert_close(target[:, :4] * torch.tensor([*size, *size]), torch.from_numpy(ann.boxes))

    augmented = VOCDetection(voc_data, "train", CLASSES, 300, augment=True, seed=5)
    augmented.set_epoch(1)
    first, again = augmented[1], augmented[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # same (seed, epoch, index)
    views = []
    for epoch in range(2, 6):
        augmented.set_epoch(epoch)
        views.append(augmented[1][0])
    assert any(not torch.equal(first[0], v) for v in views)
    images, targets, sizes = collate([plain[0], plain[1]])
    assert images.shape == (2, 3, 300, 300) and len(targets) == 2 and len(sizes) == 2


def test_a_few_steps_reduce_the_loss_on_tiny_data(voc_data: Path) -> None:
    torch.manual_seed(0)
    data = VOCDetection(voc_data, "train", CLASSES, 300)
    images, targets, _ = collate([data[i] for i in range(3)])
    model = build_detector("ssd300", len(CLASSES) + 1, TINY)
    criterion = MultiBoxLoss(default_boxes(model.config))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            loss_l, loss_c = criterion(*model(images), targets)
        return float(loss_l + loss_c)

    start = loss_now()
    for _ in range(6):
        model.train()
        loss_l, loss_c = criterion(*model(images), targets)
        optimizer.zero_grad()
        (loss_l + loss_c).backward()
        nn.utils.clip_grad_value_(model.parameters(), 2.0)
        optimizer.step()
    assert loss_now() < 0.8 * start


def test_base_weights_load_from_the_reducedfc_layout(tmp_path: Path) -> None:
    donor = SSD(5, SSD300_VOC, TINY)
    base = tmp_path / "vgg16_reducedfc.pth"
    torch.save(donor.vgg.state_dict(), base)  # keys 0.weight .. 33.bias, as the book's file
    model = build_detector("ssd300", 5, TINY, base)
    for key, value in donor.vgg.state_dict().items():
        assert torch.equal(model.vgg.state_dict()[key], value)
    with pytest.raises(TrainError, match=r"does not fit the VGG base of an ssd300 at width 0\.125"):
        build_detector("ssd300", 5, 1 / 8, base)


def test_command_writes_checkpoints_the_service_loads(trained_detector: Path, voc_data: Path) -> None:
    out = trained_detector
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"metric", "map", "val_loss", "train_loss", "train_loss_loc", "lr"} <= set(history[0])
    assert history[0]["metric"] == "voc07" and set(history[0]["ap_per_class"]) == set(CLASSES)
    # --warmup-iters 2 over the 2 steps of epoch 1, then --lr-steps 1: a tenth in epoch 2
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 1e-4])
    detector = load_model(
        ModelSpec(name="shapes", task="detect", arch="ssd300", format="project", weights=out / "best.pth")
    )
    assert detector.info.labels == list(CLASSES) and detector.info.input_size == (300, 300)
    metadata = torch.load(out / "best.pth", weights_only=True)["metadata"]
    assert metadata["variant"] == "SSD300 width 1/16" and metadata["width"] == TINY
    best_epoch = max(history, key=lambda h: h["map"])["epoch"]
    assert metadata["epoch"] == best_epoch and metadata["val_metric"] == "voc07"
    assert metadata["val_map"] == history[best_epoch - 1]["map"]
    # the book's layout: served as ssd.pytorch with the labels given
    plain = load_model(
        ModelSpec(
            name="plain",
            task="detect",
            arch="ssd300",
            format="ssd.pytorch",
            weights=out / "last_state_dict.pth",
            labels=CLASSES,
        )
    )
    assert plain.info.num_classes == 4
    assert (out / "train_state.pth").is_file()


def test_batchnorm_folds_into_the_plain_ssd_with_the_same_outputs() -> None:
    from train.batchnorm import add_batchnorm, fold_batchnorm

    torch.manual_seed(0)
    net = add_batchnorm(build_detector("ssd300", 5, TINY))
    x = torch.randn(2, 3, 300, 300) * 60
    net.train()
    with torch.no_grad():
        for _ in range(3):  # give every BatchNorm running statistics and affine terms away from 1 / 0
            net(x)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    plain = fold_batchnorm(net)
    assert set(plain.state_dict()) == set(SSD(5, SSD300_VOC, TINY).state_dict())  # the book's keys
    with torch.no_grad():
        (loc_bn, conf_bn), (loc, conf) = net(x), plain(x)
    torch.testing.assert_close(loc, loc_bn, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conf, conf_bn, rtol=1e-4, atol=1e-4)


def test_base_from_a_trained_classifier_computes_the_classifiers_features(tmp_path: Path) -> None:
    from models.checkpoints import save_project_checkpoint
    from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, SSD_PIXEL_MEAN_RGB
    from models.vgg import vgg16_bn
    from train.batchnorm import add_batchnorm
    from train.detector import base_from_classifier

    torch.manual_seed(0)
    classifier = vgg16_bn(num_classes=4, width=TINY)
    with torch.no_grad():  # BatchNorm with statistics and affine terms of its own
        for m in classifier.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    classifier.eval()
    path = save_project_checkpoint(
        tmp_path / "cls.pth",
        classifier,
        task="classify",
        arch="vgg16_bn",
        labels=list("abcd"),
        preprocess={"kind": "classifier", "resize": 64, "crop": 64},
    )
    pixels = torch.rand(2, 3, 64, 64) * 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    x_cls = (pixels / 255 - mean) / std
    x_ssd = pixels - torch.tensor(SSD_PIXEL_MEAN_RGB)[:, None, None]
    with torch.no_grad():
        expected_first = classifier.features[:3](x_cls)  # conv1_1, BN, ReLU
        expected_conv4_3 = classifier.features[:33](x_cls)  # up to conv4_3's ReLU
    for with_bn in (False, True):
        net = build_detector("ssd300", 5, TINY)
        if with_bn:
            net = add_batchnorm(net)
        assert "vgg16_bn" in base_from_classifier(net, path)
        net.eval()
        with torch.no_grad():
            first = nn.Sequential(*net.vgg[:2])(x_ssd)  # conv1_1 (its BatchNorm folded in or kept), ReLU
            conv4_3 = nn.Sequential(*net.vgg[:23])(x_ssd)
        # exact away from the border (the zero padding differs by the ~0.01 mean shift)
        torch.testing.assert_close(
            first[..., 1:-1, 1:-1], expected_first[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4
        )
        assert (conv4_3 - expected_conv4_3).abs().max() < 0.05 * expected_conv4_3.abs().max()
    with pytest.raises(TrainError, match=r"give --width 0\.0625"):
        base_from_classifier(build_detector("ssd300", 5, 1 / 8), path)
