"""Networks, checkpoints, pre- and post-processing for VGG16 classifiers and SSD detectors.

This package never imports HTTP or settings code (``tests/models/test_import_graph.py`` checks).
Callers use the names exported here:

    spec = ModelSpec(name="ssd-voc", task="detect", arch="ssd300", format="ssd.pytorch",
                     weights=Path("ssd300_mAP_77.43_v2.pth"), labels=VOC_CLASSES)
    det = load_model(spec, device="cuda", precision="fp32")        # -> Detector
    batch = torch.stack([det.preprocess(img) for img in rgb_pil_images])
    outs = det.run(batch, [img.size for img in rgb_pil_images],
                   [DetectParams(score_threshold=0.5)] * len(rgb_pil_images))
"""

from models.agreement import agreement_report, apply_with_report, reference_outputs
from models.checkpoints import sha256_file
from models.errors import CheckpointError, ModelConfigError
from models.labels import COCO_CATEGORIES, IMAGENET_CATEGORIES, VOC_CLASSES
from models.openvino_runtime import OPENVINO_PRECISIONS, require_openvino, use_openvino
from models.predictors import (
    Classifier,
    Detector,
    Predictor,
    check_device_name,
    device_memory,
    load_model,
    resolve_device,
)
from models.quantize import (
    load_calibration_images,
    quantize_int8,
    quantize_predictor,
    quantize_predictor_with_report,
)
from models.types import (
    ARCH_TASKS,
    ARCHS,
    DEVICE_PATTERN,
    FORMATS,
    TASK_OPTIONS,
    ClassifyOptions,
    ClassifyOutput,
    DetectOutput,
    DetectParams,
    ModelInfo,
    ModelSpec,
    Precision,
    Task,
)

__all__ = [
    "ARCHS",
    "ARCH_TASKS",
    "COCO_CATEGORIES",
    "DEVICE_PATTERN",
    "FORMATS",
    "IMAGENET_CATEGORIES",
    "OPENVINO_PRECISIONS",
    "TASK_OPTIONS",
    "VOC_CLASSES",
    "CheckpointError",
    "Classifier",
    "ClassifyOptions",
    "ClassifyOutput",
    "DetectOutput",
    "DetectParams",
    "Detector",
    "ModelConfigError",
    "ModelInfo",
    "ModelSpec",
    "Precision",
    "Predictor",
    "Task",
    "agreement_report",
    "apply_with_report",
    "check_device_name",
    "device_memory",
    "load_calibration_images",
    "load_model",
    "quantize_int8",
    "quantize_predictor",
    "quantize_predictor_with_report",
    "reference_outputs",
    "require_openvino",
    "resolve_device",
    "sha256_file",
    "use_openvino",
]
