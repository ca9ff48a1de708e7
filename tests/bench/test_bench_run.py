"""Benchmark plumbing: level tokens, defaults per mode and device, the server configurations it
starts, the JPEG inputs, and a server process's start / readiness / CPU accounting / stop."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.ceiling import ALLOCATOR_ENV, gflop_per_image, matmul_peak_gflops, measure, time_forward
from bench.inputs import (
    _toml_entry,
    bench_model,
    find_packaged_file,
    fit,
    images_of_size,
    write_calibration,
    write_images,
)
from bench.run import Bench, Level, build_parser, parse_levels, resolve_defaults
from bench.servers import (
    ServerConfig,
    ServerProcess,
    device_memory_by_worker,
    gpu_processes_mib,
    http_get_status,
)


def args_for(*argv: str) -> argparse.Namespace:
    return resolve_defaults(build_parser().parse_args(list(argv)))


def test_level_tokens() -> None:
    assert parse_levels("1, 16,32x8,16@1920x1080,4x2@1920x1080", "500x375") == [
        Level(1, 1, "500x375"),
        Level(16, 1, "500x375"),
        Level(32, 8, "500x375"),
        Level(16, 1, "1920x1080"),
        Level(4, 2, "1920x1080"),
    ]
    with pytest.raises(ValueError):
        Level.parse("0", "500x375")


def test_defaults_by_mode_and_device(tmp_path: Path) -> None:
    quick = args_for("--quick", "--out", str(tmp_path))
    assert quick.models == ["vgg16"] and quick.ours == ["bf16"]
    assert quick.peers == ["fastapi", "litserve"] and quick.openvino is True
    assert quick.peer_precisions == ["fp32", "bf16"]  # typical setup and ours' precision
    assert quick.work_dir == tmp_path / "work"
    full = args_for()
    assert full.models == ["vgg16", "ssd300"]
    assert full.ours == ["int8", "bf16", "fp32"] and full.ceiling_precisions == ["int8", "bf16", "fp32"]
    assert quick.ceiling_precisions == ["int8", "bf16", "fp32"]  # every anchor, also in the smoke test
    assert full.peer_precisions == ["fp32", "bf16"]  # the peers have no int8: their fastest float
    assert [lv.clients for lv in parse_levels(full.concurrency, "500x375")][:7] == [1, 2, 4, 8, 16, 32, 64]
    gpu = args_for("--device", "cuda", "--peers", "none")
    assert gpu.ours == ["fp16"] and gpu.peers == [] and gpu.openvino is False
    assert gpu.ceiling_precisions == ["fp16", "bf16", "fp32"] and max(gpu.batches) >= 128
    assert args_for("--ours", "int8", "--peers", "litserve").peer_precisions == ["fp32", "bf16"]
    assert args_for("--ours", "fp32,int8").peer_precisions == ["fp32"]


def test_server_configurations(tmp_path: Path) -> None:
    args = args_for("--out", str(tmp_path), "--ours-env", "VISION_MAX_DELAY_MS=7", "--max-batch-size", "16",
                    "--deadline-ms", "2000")  # fmt: skip
    configs = {c.label: c for c in Bench(args).server_configs("ssd300")}
    assert list(configs) == [
        "ours int8",
        "ours bf16",
        "ours fp32",  # issue 15: ours at fp32 against the best fp32 runtime
        "fastapi fp32",
        "fastapi bf16",
        "litserve fp32",
        "litserve bf16",
    ]
    # int8 is calibrated at start on the bench's own calibration images; bf16 needs none
    assert configs["ours int8"].env["VISION_INT8_CALIBRATION_DIR"] == str(tmp_path / "work" / "calibration")
    assert "VISION_WORKERS" not in configs["ours int8"].env
    several = Bench(
        args_for("--out", str(tmp_path), "--ours", "fp16", "--ours-workers", "1,4", "--peers", "none")
    )
    by_label = {c.label: c for c in several.server_configs("vgg16")}
    assert list(by_label) == ["ours fp16", "ours fp16 x4 workers"]
    assert by_label["ours fp16 x4 workers"].env["VISION_WORKERS"] == "4"
    assert "VISION_INT8_CALIBRATION_DIR" not in configs["ours bf16"].env
    ours = configs["ours bf16"]
    assert ours.module == "app" and ours.ready_path == "/health/ready"
    assert ours.env["VISION_PRECISION"] == "bf16" and ours.env["VISION_MAX_BATCH_SIZE"] == "16"
    assert ours.env["VISION_MAX_DELAY_MS"] == "7"
    assert ours.env["VISION_MODELS_FILE"] == str(tmp_path / "work" / "models-ssd300.toml")
    assert ours.headers == (("X-Request-Timeout-Ms", "2000"),)
    assert ours.predict_path == configs["litserve bf16"].predict_path == "/v1/models/ssd300/predict"
    # the typical fp32 setups run as they come; the same-precision ones get the careful allocator
    assert dict(configs["fastapi fp32"].env) == {}
    assert dict(configs["litserve bf16"].env) == ALLOCATOR_ENV
    assert "--max-batch-size" in configs["litserve bf16"].args
    assert "--port" in ours.argv(1234) and ours.argv(1234)[-1] == "1234"
    assert ours.cwd is None  # ours from this checkout


def test_ours_runs_with_each_jpeg_decode_and_worker_count(tmp_path: Path) -> None:
    assert args_for().ours_decodes == []  # by default the service's own choice, unlabelled
    args = args_for("--out", str(tmp_path), "--device", "cuda", "--ours-decodes", "device,cpu",
                    "--ours-workers", "4,1")  # fmt: skip
    configs = {c.label: c for c in Bench(args).server_configs("vgg16")}
    assert list(configs) == [  # in the order asked: a time-boxed run measures the first ones first
        "ours fp16 decode device x4 workers",
        "ours fp16 decode cpu x4 workers",
        "ours fp16 decode device",
        "ours fp16 decode cpu",
    ]
    assert configs["ours fp16 decode cpu x4 workers"].env["VISION_JPEG_DECODE"] == "cpu"
    assert configs["ours fp16 decode cpu x4 workers"].env["VISION_WORKERS"] == "4"
    assert configs["ours fp16 decode device"].env["VISION_JPEG_DECODE"] == "device"
    assert "VISION_WORKERS" not in configs["ours fp16 decode device"].env


def test_a_baseline_checkout_runs_beside_ours(tmp_path: Path) -> None:
    args = args_for(
        "--out", str(tmp_path), "--ours", "int8,fp32", "--peers", "none", "--ours-baseline", "../old"
    )
    configs = {c.label: c for c in Bench(args).server_configs("vgg16")}
    assert list(configs) == ["ours int8", "ours int8 (baseline)", "ours fp32", "ours fp32 (baseline)"]
    baseline = configs["ours int8 (baseline)"]
    assert baseline.cwd == Path("../old").resolve() and configs["ours int8"].cwd is None
    assert dict(baseline.env) == dict(configs["ours int8"].env)  # the same settings, the other code
    # the baseline starts in its own checkout: every path it is given must not depend on the cwd
    relative = args_for("--out", "rel-out", "--ours", "int8", "--peers", "none", "--ours-baseline", "../old")
    (config,) = [c for c in Bench(relative).server_configs("vgg16") if c.cwd is not None]
    paths = [v for k, v in config.env.items() if k in ("VISION_MODELS_FILE", "VISION_INT8_CALIBRATION_DIR")]
    assert len(paths) == 2 and all(Path(v).is_absolute() for v in paths)


def test_ours_runs_with_each_runtime_asked_for(tmp_path: Path) -> None:
    assert args_for().ours_runtimes == ["torch"]  # by default, ours as it serves by default
    args = args_for("--out", str(tmp_path), "--ours-runtimes", "torch,openvino", "--peers", "none",
                    "--ours-workers", "1,2")  # fmt: skip
    configs = {c.label: c for c in Bench(args).server_configs("vgg16")}
    # every precision with torch; OpenVINO only where it runs (fp32, int8): bf16 would stop the start
    assert list(configs) == [
        "ours int8",
        "ours int8 x2 workers",
        "ours int8 openvino",
        "ours int8 openvino x2 workers",
        "ours bf16",
        "ours bf16 x2 workers",
        "ours fp32",
        "ours fp32 x2 workers",
        "ours fp32 openvino",
        "ours fp32 openvino x2 workers",
    ]
    calibration = str(tmp_path / "work" / "calibration")
    assert "VISION_RUNTIME" not in configs["ours int8"].env  # torch: the service's default
    openvino = configs["ours int8 openvino"]
    assert openvino.env["VISION_RUNTIME"] == "openvino" and openvino.precision == "int8"
    assert openvino.env["VISION_INT8_CALIBRATION_DIR"] == calibration  # the same images as torch int8
    # OpenVINO fp32 gets them too, for the agreement check against torch at start; torch fp32 needs none
    assert configs["ours fp32 openvino"].env["VISION_INT8_CALIBRATION_DIR"] == calibration
    assert "VISION_INT8_CALIBRATION_DIR" not in configs["ours fp32"].env
    assert configs["ours fp32 openvino x2 workers"].env["VISION_WORKERS"] == "2"


def _red(image: Image.Image, xy: tuple[int, int]) -> int:
    pixel = image.getpixel(xy)
    assert isinstance(pixel, tuple)
    return int(pixel[0])


def test_fit_crops_to_the_aspect_ratio_then_resizes() -> None:
    image = Image.new("RGB", (640, 427))
    image.paste((255, 0, 0), (0, 0, 100, 427))  # a red band on the left
    wide = fit(image, 1920, 1080)
    assert wide.size == (1920, 1080)
    # 16:9 from 640x427: full width kept (crop top and bottom), so the red band is still there
    assert _red(wide, (10, 540)) > 200
    narrow = fit(image, 500, 375)
    assert narrow.size == (500, 375)
    # 4:3 from 640x427: 569 columns kept, 35 cut each side: the band shrinks from 100 to ~65 px
    assert _red(narrow, (5, 187)) > 200 and _red(narrow, (70, 187)) < 50


def test_bench_jpegs_come_from_packaged_photos(tmp_path: Path) -> None:
    assert find_packaged_file("sklearn/datasets/images/china.jpg") is not None
    images = write_images(tmp_path, sizes=[(500, 375)])
    assert [i.name for i in images] == ["china_500x375", "flower_500x375"]
    for image in images:
        assert image.source == "sklearn"
        decoded = Image.open(io.BytesIO(image.path.read_bytes()))
        assert decoded.format == "JPEG" and decoded.size == (500, 375)
    assert len(images_of_size(images, "500x375")) == 2
    with pytest.raises(ValueError, match="1920x1080"):
        images_of_size(images, "1920x1080")
    assert (tmp_path / "inputs.json").exists()


def test_calibration_images_are_varied_crops_of_the_photos(tmp_path: Path) -> None:
    folder = write_calibration(tmp_path / "calibration", count=6)
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 6
    pixels = set()
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (500, 375)
            pixels.add(image.convert("RGB").resize((8, 6)).tobytes())
    assert len(pixels) == 6  # six different crops, not one picture six times
    assert write_calibration(folder, count=6) == folder and sorted(folder.glob("*.jpg")) == files


def test_written_jpegs_are_reused_without_the_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_images(tmp_path, sizes=[(500, 375)])

    def no_photos() -> None:
        raise AssertionError("the photos were looked for again")

    monkeypatch.setattr("bench.inputs.source_photos", no_photos)
    assert write_images(tmp_path, sizes=[(500, 375)]) == first


def test_models_toml_entries(tmp_path: Path) -> None:
    ssd = bench_model("ssd300", tmp_path)
    entry = _toml_entry(ssd)
    assert (
        'format = "ssd.pytorch"' in entry and '"tvmonitor"' in entry and ssd.labels and len(ssd.labels) == 20
    )
    vgg = bench_model("vgg16", tmp_path)
    assert 'format = "torchvision"' in _toml_entry(vgg) and vgg.labels is None
    with pytest.raises(ValueError, match="unknown benchmark model"):
        bench_model("resnet", tmp_path)


def test_time_forward_counts_calls() -> None:
    calls: list[int] = []
    syncs: list[int] = []
    n, seconds = time_forward(lambda: calls.append(1), lambda: syncs.append(1), min_seconds=0.0, min_iters=5)
    assert n == 5 and len(calls) == 5 + 2  # two warm-up calls are not timed
    assert seconds >= 0 and syncs


def test_arithmetic_is_counted_per_image_and_put_against_the_matmul_peak() -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    net = net.to(memory_format=torch.channels_last)
    # 8 x 8 outputs x 4 channels x (3 x 3 x 3) multiply-adds, 2 FLOPs each, for one image
    assert gflop_per_image(net, (8, 8), "cpu", "fp32") == pytest.approx(2 * 8 * 8 * 4 * 27 / 1e9)
    peak = matmul_peak_gflops("cpu", "fp32", min_seconds=0.0)
    assert peak is not None and peak > 0
    assert matmul_peak_gflops("cpu", "int8") is None  # no float matmul to hold int8 against
    result = measure(net, (8, 8), "cpu", "fp32", [2], min_seconds=0.0, min_iters=2, gflop=0.5)
    best, arithmetic = result["best"], result["arithmetic"]
    assert arithmetic["gflops"] == pytest.approx(best["images_per_s"] * 0.5, rel=1e-3)
    assert arithmetic["peak_fraction"] == pytest.approx(
        arithmetic["gflops"] / result["matmul_peak_gflops"], rel=1e-2
    )
    assert measure(net, (8, 8), "cpu", "fp32", [1], min_seconds=0.0, min_iters=1)["arithmetic"] is None


def test_server_process_lifecycle(tmp_path: Path) -> None:
    # a stdlib HTTP server stands in for a model server; like them it takes --port last
    (tmp_path / "bench_test_shim.py").write_text(
        "import sys, http.server\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', port), http.server.SimpleHTTPRequestHandler)"
        ".serve_forever()\n"
    )
    config = ServerConfig(
        "shim", "test", "fp32", "bench_test_shim", (), "/", "/", env={"PYTHONPATH": str(tmp_path)}
    )
    server = ServerProcess(config, tmp_path / "server.log")
    assert config.argv(server.port)[:3] == [sys.executable, "-m", "bench_test_shim"]
    with server:
        assert server.wait_ready(30) >= 0
        assert http_get_status(server.port, "/") == 200
        assert server.cpu_seconds() > 0  # python's start-up at least
        pid = server.proc.pid if server.proc else -1
    assert server.proc is None
    assert not Path(f"/proc/{pid}").exists()
    assert http_get_status(server.port, "/", timeout_s=0.5) is None


def test_server_that_dies_reports_its_log(tmp_path: Path) -> None:
    config = ServerConfig("broken", "test", "fp32", "bench_no_such_module", (), "/", "/")
    with (
        ServerProcess(config, tmp_path / "broken.log") as server,
        pytest.raises(RuntimeError, match="No module"),
    ):
        server.wait_ready(30)


def test_gpu_memory_per_worker_from_metrics_and_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = "\n".join(
        [
            "# TYPE vision_device_memory_bytes gauge",
            'vision_device_memory_bytes{device="cuda:0",kind="reserved",pid="41"} 1.048576e+09',
            'vision_device_memory_bytes{device="cuda:0",kind="peak_reserved",pid="41"} 2097152.0',
            'vision_device_memory_bytes{device="cuda:0",kind="reserved",pid="7"} 524288.0',
            'vision_requests_total{endpoint="/v1/classify",model="m",status="200"} 3.0',
        ]
    )
    assert device_memory_by_worker(pool) == {
        "41": {"reserved": 1000.0, "peak_reserved": 2.0},
        "7": {"reserved": 0.5},
    }
    single = 'vision_device_memory_bytes{device="cuda:0",kind="allocated"} 3145728.0\n'
    assert device_memory_by_worker(single) == {"0": {"allocated": 3.0}}  # one process: no pid label
    assert device_memory_by_worker("# TYPE vision_device_memory_bytes gauge\n") == {}  # CPU

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '41, 1532\\n7, 980\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert gpu_processes_mib() == {"41": 1532.0, "7": 980.0}
    fake.write_text("#!/bin/sh\nexit 9\n")  # a driver that does not answer
    assert gpu_processes_mib() is None
