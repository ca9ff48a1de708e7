"""Reloading the models file while serving (app/reload.py): added, replaced and removed models,
nothing changed on any failure, verification before a swap, no failed request during a swap, the
admin route and its keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.reload import reload_models
from models import VOC_CLASSES
from tests import checkpoint_factory as cf
from tests.app.harness import TINY, running, settings_for
from tests.app.helpers import encode, jpeg, photo

CLASSIFIER = "clf"
DETECTOR = "det"


def entry(name: str, task: str, arch: str, weights: str, extra: str = "") -> str:
    return (
        f'[[models]]\nname = "{name}"\ntask = "{task}"\narch = "{arch}"\nformat = "auto"\n'
        f'weights = "{weights}"\n{extra}\n'
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A classifier and a detector, each with its checkpoint, and a folder of images to verify on."""
    cf.write_torchvision_vgg16(tmp_path / "clf-a.pth", width=TINY, seed=0)
    cf.write_book_ssd(tmp_path / "det-a.pth", width=TINY, confident=True, gpu=False)
    (tmp_path / "voc.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (tmp_path / "verify").mkdir()
    for seed in range(6):
        (tmp_path / "verify" / f"{seed}.png").write_bytes(encode(photo(64, 48, seed=seed), "PNG"))
    write_models(tmp_path, clf="clf-a.pth", det="det-a.pth")
    return tmp_path


def write_models(
    folder: Path, *, clf: str | None, det: str | None, extra: str = "", det_name: str = DETECTOR
) -> None:
    text = ""
    if clf is not None:
        text += entry(CLASSIFIER, "classify", "vgg16", clf, extra)
    if det is not None:
        text += entry(det_name, "detect", "ssd300", det, 'labels_file = "voc.txt"')
    (folder / "models.toml").write_text(text)


@pytest.fixture
async def client(folder: Path) -> AsyncIterator[httpx.AsyncClient]:
    keys = {"api_keys": "user-key", "admin_api_keys": "admin-key"}
    app = create_app(settings_for(models_file=folder / "models.toml", max_batch_size=2, **keys))
    async with running(app) as c:
        c.headers["X-API-Key"] = "user-key"
        yield c


def service_of(client: httpx.AsyncClient) -> object:
    return client._transport.app.state.service  # type: ignore[attr-defined]


async def versions(client: httpx.AsyncClient) -> dict[str, str]:
    listing = (await client.get("/v1/models")).json()["models"]
    return {m["name"]: m["version"]["id"] for m in listing}


async def reload(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/admin/models/reload", headers={"X-API-Key": "admin-key"})


async def classify(client: httpx.AsyncClient, seed: int = 0) -> httpx.Response:
    return await client.post("/v1/classify", files={"file": ("a.jpg", jpeg(seed=seed))})


async def test_added_replaced_and_removed_models(client: httpx.AsyncClient, folder: Path) -> None:
    before = await versions(client)
    cf.write_torchvision_vgg16(folder / "clf-b.pth", width=TINY, seed=1)
    write_models(folder, clf="clf-b.pth", det="det-a.pth", det_name="det-renamed")
    answer = await reload(client)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["outcome"] == "applied" and len(body["reports"]) == 1
    actions = {c["model"]: c["action"] for c in body["reports"][0]["changes"]}
    assert actions == {CLASSIFIER: "replaced", "det-renamed": "added", DETECTOR: "removed"}
    after = await versions(client)
    assert set(after) == {CLASSIFIER, "det-renamed"} and after[CLASSIFIER] != before[CLASSIFIER]
    assert after["det-renamed"] == before[DETECTOR]  # the same checkpoint and entry: the same version
    answered = await classify(client)
    assert answered.status_code == 200 and answered.json()["model_version"] == after[CLASSIFIER]
    assert answered.headers["X-Model-Version"] == after[CLASSIFIER]
    gone = await client.post(f"/v1/models/{DETECTOR}/predict", files={"file": ("a.jpg", jpeg())})
    assert gone.status_code == 404
    listing = (await client.get("/v1/models")).json()
    assert listing["last_reload"]["outcome"] == "applied" and listing["last_reload"]["trigger"] == "api"
    metrics = (await client.get("/metrics")).text
    assert 'vision_reloads_total{outcome="applied"} 1.0' in metrics
    assert f'vision_model_ready{{model="{DETECTOR}"}}' not in metrics


async def test_nothing_to_do_is_unchanged(client: httpx.AsyncClient) -> None:
    before = await versions(client)
    answer = await reload(client)
    assert answer.status_code == 200 and answer.json()["outcome"] == "unchanged"
    assert await versions(client) == before


@pytest.mark.parametrize("breakage", ["truncated checkpoint", "bad toml", "unknown arch", "missing file"])
async def test_a_failed_reload_changes_nothing(
    client: httpx.AsyncClient, folder: Path, breakage: str
) -> None:
    before = await versions(client)
    if breakage == "truncated checkpoint":
        cf.write_truncated(
            folder / "clf-b.pth", cf.write_torchvision_vgg16(folder / "full.pth", width=TINY, seed=2)
        )
        write_models(folder, clf="clf-b.pth", det="det-a.pth")
    elif breakage == "bad toml":
        (folder / "models.toml").write_text("[[models]\nname = ")
    elif breakage == "unknown arch":
        (folder / "models.toml").write_text(entry(CLASSIFIER, "classify", "resnet50", "clf-a.pth"))
    else:
        write_models(folder, clf="nowhere.pth", det="det-a.pth")
    answer = await reload(client)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["code"] == "RELOAD_FAILED" and body["outcome"] == "failed" and body["request_id"]
    assert body["reports"][0]["error"] and str(folder) in body["error"]
    assert await versions(client) == before  # everything as it was
    assert (await classify(client)).status_code == 200
    assert 'vision_reloads_total{outcome="failed"} 1.0' in (await client.get("/metrics")).text


async def test_verification_keeps_the_old_version_when_answers_differ(
    client: httpx.AsyncClient, folder: Path
) -> None:
    before = await versions(client)
    cf.write_torchvision_vgg16(folder / "clf-b.pth", width=TINY, seed=7)  # other weights: other answers
    write_models(
        folder, clf="clf-b.pth", det="det-a.pth", extra='verify_dir = "verify"\nverify_agreement = 0.9'
    )
    answer = await reload(client)
    assert answer.status_code == 422 and answer.json()["code"] == "RELOAD_REJECTED", answer.text
    report = answer.json()["reports"][0]
    assert report["outcome"] == "rejected" and "verify_agreement" in report["error"]
    assert await versions(client) == before


async def test_verification_lets_an_equivalent_version_through(
    client: httpx.AsyncClient, folder: Path
) -> None:
    before = await versions(client)
    # the same weights in another file layout (zip, saved from the GPU format's CPU twin): new bytes
    cf.write_book_vgg16(folder / "clf-b.pth", num_classes=1000, width=TINY, seed=0, gpu=False, legacy=False)
    write_models(folder, clf="clf-b.pth", det="det-a.pth", extra='verify_dir = "verify"')
    answer = await reload(client)
    assert answer.status_code == 200, answer.text
    (change,) = [c for c in answer.json()["reports"][0]["changes"] if c["action"] == "replaced"]
    assert change["verification"]["agreement"] == 1.0 and change["verification"]["min_agreement"] == 0.9
    after = await versions(client)
    assert (
        after[CLASSIFIER] != before[CLASSIFIER] == change["from_version"]
        and after[CLASSIFIER] == change["to_version"]
    )


async def test_no_request_fails_during_a_swap(client: httpx.AsyncClient, folder: Path) -> None:
    old = (await versions(client))[CLASSIFIER]
    seen: list[tuple[bool, int, str]] = []  # (sent after the reload returned, status, version)
    swapped = asyncio.Event()
    stop = asyncio.Event()

    async def steady(offset: int) -> None:
        seed = offset
        while not stop.is_set():
            after = swapped.is_set()
            response = await classify(client, seed)
            seen.append((after, response.status_code, response.headers.get("X-Model-Version", "")))
            seed += 4

    load = [asyncio.create_task(steady(i)) for i in range(4)]
    while len(seen) < 8:
        await asyncio.sleep(0.01)
    cf.write_torchvision_vgg16(folder / "clf-b.pth", width=TINY, seed=3)
    write_models(folder, clf="clf-b.pth", det="det-a.pth")
    report = await reload_models(service_of(client), "test")  # type: ignore[arg-type]
    swapped.set()
    while sum(after for after, _, _ in seen) < 8:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*load)
    new = (await versions(client))[CLASSIFIER]
    assert report.outcome == "applied" and new != old
    assert {status for _, status, _ in seen} == {200}, [s for s in seen if s[1] != 200]
    assert {version for _, _, version in seen} == {old, new}  # both answered while the load ran
    assert {version for after, _, version in seen if after} == {new}
    service = service_of(client)
    for _ in range(200):  # the old version is stopped once no request holds it
        if not service.retiring:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    assert not service.retiring  # type: ignore[attr-defined]


async def test_admin_route_takes_only_admin_keys(client: httpx.AsyncClient) -> None:
    no_key = await client.post("/admin/models/reload", headers={"X-API-Key": ""})
    assert no_key.status_code == 401
    user = await client.post("/admin/models/reload")  # the client's user key
    assert user.status_code == 403 and user.json()["code"] == "FORBIDDEN"
    wrong = await client.post("/admin/models/reload", headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401
    admin_elsewhere = await client.get("/v1/models", headers={"X-API-Key": "admin-key"})
    assert admin_elsewhere.status_code == 401  # an admin key is for /admin/ only


async def test_without_admin_keys_the_route_does_not_exist(folder: Path) -> None:
    app = create_app(settings_for(models_file=folder / "models.toml", api_keys="user-key"))
    async with running(app) as client:
        answer = await client.post("/admin/models/reload", headers={"X-API-Key": "user-key"})
        assert answer.status_code == 404
    with pytest.raises(ValueError, match="VISION_ADMIN_API_KEYS needs VISION_API_KEYS"):
        settings_for(admin_api_keys="admin-key")


async def test_a_reload_asked_while_starting_runs_once_the_start_ends(folder: Path) -> None:
    """A reload that comes during the start (a worker's start can overlap a request to the pool)
    waits for it instead of failing; the start read the models file itself, so nothing changes."""
    keys = {"api_keys": "user-key", "admin_api_keys": "admin-key"}
    app = create_app(settings_for(models_file=folder / "models.toml", **keys))
    async with running(app, ready=False) as client:
        service = client._transport.app.state.service  # type: ignore[attr-defined]
        assert not service.ready  # the models load in a thread: this request comes before that ends
        answer = await reload(client)
        assert answer.status_code == 200, answer.text
        (report,) = answer.json()["reports"]
        assert report["outcome"] == "unchanged" and service.ready


async def test_a_worker_answers_the_reload_requests_it_missed_while_starting(folder: Path) -> None:
    """With VISION_WORKERS > 1, a request written while this worker was starting (it may have been
    started again after the SIGHUP) is answered once its start has ended."""
    shared = folder / "pool"
    (shared / "reloads").mkdir(parents=True)
    (shared / "reloads" / "waiting1.request").touch()
    settings = settings_for(models_file=folder / "models.toml", workers=2, worker_slot=1, worker_dir=shared)
    async with running(create_app(settings)):
        answer = shared / "reloads" / "waiting1.1.json"
        for _ in range(500):
            if answer.exists():
                break
            await asyncio.sleep(0.02)
        report = json.loads(answer.read_text())
        assert report["worker"] == 1 and report["trigger"] == "api" and report["outcome"] == "unchanged"
        assert not (shared / "reloads" / "waiting1.0.json").exists()  # each worker answers for itself
