"""The service on CUDA (skipped without it): same answers as on the CPU, auto precision is bf16."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import torch
from torchvision.ops import box_iou

from tests.app.harness import CLASSIFIER, DETECTOR, serve, settings_for
from tests.app.helpers import jpeg, png

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is false)"
    ),
]


async def test_cuda_answers_match_the_cpu(client: httpx.AsyncClient, tiny_models_file: Path) -> None:
    async with serve(tiny_models_file, max_batch_size=4, device="cuda") as gpu:
        models = (await gpu.get("/v1/models")).json()["models"]
        assert {m["device"] for m in models} == {"cuda:0"} and {m["dtype"] for m in models} == {"float32"}

        files = [("file", (f"{i}.png", png(64, 48, seed=i))) for i in range(5)]
        on_gpu = (await gpu.post("/v1/classify", files=files)).json()["results"]
        on_cpu = (await client.post("/v1/classify", files=files)).json()["results"]
        for g, c in zip(on_gpu, on_cpu, strict=True):
            assert [p["score"] for p in g["predictions"]] == pytest.approx(
                [p["score"] for p in c["predictions"]], abs=1e-3
            )

        data = jpeg(160, 120)
        g_det = (await gpu.post("/v1/detect", files={"file": ("a.jpg", data)})).json()["results"][0][
            "detections"
        ]
        c_det = (await client.post("/v1/detect", files={"file": ("a.jpg", data)})).json()["results"][0][
            "detections"
        ]
        assert g_det and abs(len(g_det) - len(c_det)) <= 2  # ties at the threshold may differ

        def boxes(ds: list[dict[str, dict[str, float]]]) -> torch.Tensor:
            return torch.tensor([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in ds])

        best = box_iou(boxes(g_det), boxes(c_det)).max(dim=1).values
        assert (best > 0.98).float().mean() > 0.9  # nearly every GPU box has its CPU twin

        memory = {  # this worker's allocator bytes on the GPU, after its last batch
            m.group(1): float(m.group(2))
            for m in re.finditer(
                r'vision_device_memory_bytes\{device="cuda:0",kind="(\w+)"\} (\S+)',
                (await gpu.get("/metrics")).text,
            )
        }
        assert set(memory) == {"allocated", "reserved", "peak_reserved"}, memory
        assert 0 < memory["allocated"] <= memory["reserved"] <= memory["peak_reserved"]


async def test_auto_precision_on_cuda(tiny_models_file: Path) -> None:
    settings = settings_for(device="cuda", precision="auto")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert settings.torch_precision == expected
    async with serve(tiny_models_file, max_batch_size=2, device="cuda", precision="auto") as gpu:
        by_name = {m["name"]: m for m in (await gpu.get("/v1/models")).json()["models"]}
        assert by_name[CLASSIFIER]["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[expected]
        response = await gpu.post("/v1/classify", files={"file": ("a.png", png())})
        assert response.status_code == 200
        assert sum(p["score"] for p in response.json()["results"][0]["predictions"]) <= 1.0 + 1e-6
        assert (await gpu.post("/v1/detect", files={"file": ("a.jpg", jpeg())})).json()["model"] == DETECTOR


async def test_jpegs_decoded_on_the_gpu_answer_like_the_cpu(
    client: httpx.AsyncClient, tiny_models_file: Path
) -> None:
    """VISION_JPEG_DECODE=auto is nvJPEG on CUDA: same top-1 and near-equal scores as PIL on the CPU,
    EXIF orientation applied, and a corrupt JPEG fails alone with 400."""
    async with serve(tiny_models_file, max_batch_size=4, max_delay_ms=100, device="cuda") as gpu:
        orientations = (None, 6, 3)
        files = [
            ("file", (f"{i}.jpg", jpeg(200, 150, seed=i, orientation=o))) for i, o in enumerate(orientations)
        ]
        on_gpu = (await gpu.post("/v1/classify", files=files)).json()["results"]
        on_cpu = (await client.post("/v1/classify", files=files)).json()["results"]
        for g, c in zip(on_gpu, on_cpu, strict=True):
            assert g["image"] == c["image"]
            assert g["predictions"][0]["class_id"] == c["predictions"][0]["class_id"]
            assert [p["score"] for p in g["predictions"]] == pytest.approx(
                [p["score"] for p in c["predictions"]], abs=0.02
            )
        good = jpeg(64, 48, seed=9)
        bad = bytearray(good)
        bad[good.index(b"\xff\xda") + 5] = 0x09  # a scan naming a component that does not exist
        two = [("file", ("ok.jpg", good)), ("file", ("x.jpg", bytes(bad)))]
        answer = await gpu.post("/v1/classify", files=two)
        assert answer.status_code == 400 and answer.json()["error"].startswith("image 1: ")
        assert (await gpu.post("/v1/classify", files={"file": ("ok.jpg", good)})).status_code == 200
