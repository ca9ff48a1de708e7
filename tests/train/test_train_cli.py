"""``python -m train`` as a command: an exact ``--resume``, a refused one, problems as messages with
exit code 2 (only ``__main__`` ends the process), and a missing ``train`` extra named."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tests.train.conftest import CLASSIFIER_RUN, DETECTOR_RUN, command
from train.__main__ import TRAIN_EXTRA_MODULES, main

REPO = Path(__file__).resolve().parents[2]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)["state_dict"]
    return state


def _assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = _weights(resumed / "last.pth"), _weights(uninterrupted / "last.pth")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    history = json.loads((resumed / "history.json").read_text())
    expected = json.loads((uninterrupted / "history.json").read_text())
    for record in (*history, *expected):
        record.pop("seconds")
    assert _numbers(history) == pytest.approx(_numbers(expected), abs=1e-6)


def _numbers(value: object, at: str = "") -> dict[str, object]:
    """A JSON value flattened to {path: leaf}, for a tolerant comparison."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{at}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{at}/{i}").items()}
    return {at: value}


def test_classifier_resume_continues_exactly(
    folders_data: Path, trained_classifier: Path, tmp_path: Path
) -> None:
    """1 epoch, stop, resume to 2 == the 2-epoch run of the fixture: random crops, flips, dropout
    and the shuffle all draw from the restored generators."""
    args = command("classifier", CLASSIFIER_RUN, "--data", folders_data, "--out", tmp_path)
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume", str(tmp_path)]) == 0
    _assert_same_run(tmp_path, trained_classifier)


def test_detector_resume_continues_exactly(voc_data: Path, trained_detector: Path, tmp_path: Path) -> None:
    """Augmentation, BatchNorm, the warm-up and the learning-rate step across the break."""
    args = command("detector", DETECTOR_RUN, "--data", voc_data, "--out", tmp_path)
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume", str(tmp_path / "train_state.pth")]) == 0
    _assert_same_run(tmp_path, trained_detector)


def test_resume_with_other_architecture_flags_is_refused(
    voc_data: Path, trained_detector: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(trained_detector, tmp_path / "run"))
    resume = command("--data", voc_data, "--epochs 3 --out", out, "--resume", out)
    code = main(command("detector", DETECTOR_RUN.replace("--batchnorm", ""), *resume))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "trained a network with --batchnorm; this run asks for no --batchnorm" in err
    code = main(command("detector", DETECTOR_RUN, "--width 1/8", *resume))
    assert code == 2 and "--width 0.0625; this run asks for --width 0.125" in capsys.readouterr().err
    assert json.loads((out / "history.json").read_text())[-1]["epoch"] == 2  # nothing was trained


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["detector", "--data", "{tmp}", "--out", "{tmp}/o"], "ImageSets/Main/train.txt is not there"),
        (["classifier", "--data", "{tmp}", "--mode", "transfer", "--out", "{tmp}/o"], "is not a folder"),
        (["evaluate", "--weights", "{tmp}/none.pth", "--data", "{tmp}"], "none.pth"),
        (
            ["detector", "--data", "{tmp}", "--out", "{tmp}/o", "--resume", "{tmp}/r", "--device", "cuda:7"],
            "device 'cuda:7'",
        ),
    ],
)
def test_problems_are_messages_with_exit_code_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_only_main_ends_the_process() -> None:
    """No ``raise SystemExit`` / ``sys.exit`` in train/ outside __main__.py: library functions raise."""
    offenders = []
    for path in sorted((REPO / "train").glob("*.py")):
        if path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            raised = node.exc if isinstance(node, ast.Raise) else None
            target = raised.func if isinstance(raised, ast.Call) else raised
            names = {ast.unparse(n) for n in (called, target) if n is not None}
            if names & {"SystemExit", "sys.exit", "exit", "quit"}:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_a_missing_train_extra_is_named(tmp_path: Path) -> None:
    """tqdm hidden from the import system, as in an install without the extra."""
    code = (
        "import sys; sys.modules['tqdm'] = None\n"
        "from train.__main__ import main\n"
        f"sys.exit(main(['evaluate', '--weights', 'w.pth', '--data', {str(tmp_path)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs the train extra, and tqdm is not installed: pip install -e '.[train]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_train_extra_modules_are_the_extras_packages() -> None:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    names = {
        requirement.split(">")[0].split("=")[0].split("[")[0].strip().replace("-", "_")
        for requirement in extra
    }
    assert names == set(TRAIN_EXTRA_MODULES)
