"""The examples run with tiny settings (the DDP one is in test_distributed.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, cwd: Path) -> str:
    command = [sys.executable, str(ROOT / "examples" / name), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def tiny_image_folder(root: Path) -> Path:
    """A CIFAR-10-shaped ImageFolder tree: 10 classes, 4 training and 2 test JPEGs each."""
    image = pytest.importorskip("PIL.Image")
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("test", 2)):
        for label in range(10):
            folder = root / "cifar10-jpg" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                image.fromarray(pixels.numpy()).save(folder / f"{i:04d}.jpg")
    return root / "cifar10-jpg"


def tiny_cifar(tmp_path: Path, packed: bool) -> tuple[Path, Path]:
    """(the tiny image folder, where to read it: the folder or a .tar.gz of it)."""
    folder = tiny_image_folder(tmp_path / "images")
    if not packed:
        return folder, folder
    archive_path = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(folder, arcname="cifar10-jpg")
    return folder, archive_path


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_resnet_example(tmp_path, packed):
    pytest.importorskip("torchvision", reason="the example needs the torchvision built for torch")
    _, data = tiny_cifar(tmp_path, packed)
    out = run_example(
        "cifar10_resnet.py",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--subset",
        "20",
        "--cache",
        str(tmp_path / "cache"),
        cwd=tmp_path,
    )
    assert "epoch 0: test accuracy" in out and "kept" in out


def test_torchdata_nodes_example_resumes_exactly(tmp_path):
    out = run_example("torchdata_nodes.py", "--epochs", "1", cwd=tmp_path)
    assert "batch sizes match the uninterrupted run" in out


def test_lr_coupling_example(tmp_path):
    out = run_example("lr_coupling.py", "--epochs", "2", cwd=tmp_path)
    assert "noise scale + AdaScale epoch" in out and "GeoDamp + damping epoch" in out


def test_char_lm_example_selects_sequences(tmp_path):
    out = run_example(
        "char_lm.py", "--limit", "500", "--epochs", "4", "--warmup", "2", cwd=tmp_path
    )
    rows = {
        line.split("|")[0].strip(): [float(cell) for cell in line.split("|")[1:]]
        for line in out.splitlines()
        if line.strip().startswith(("fixed", "small-loss"))
    }
    # Columns: noise in trained, after warm-up, sequences trained, test loss, seconds.
    assert set(rows) == {"fixed", "small-loss"}
    assert rows["small-loss"][1] < rows["fixed"][1]  # it trained on less noise after warm-up
    assert rows["small-loss"][2] < rows["fixed"][2]  # by dropping sequences


def test_hf_trainer_example_prints_each_policys_figures(tmp_path):
    pytest.importorskip("transformers")
    out = run_example(
        "hf_trainer.py", "--sequences", "160", "--length", "32", "--epochs", "2",
        "--policies", "fixed,infobatch", cwd=tmp_path,
    )  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-2:]}
    assert set(rows) == {"fixed", "infobatch"}
    assert int(rows["infobatch"][1]) < int(rows["fixed"][1]) == 2 * 160  # sequences trained


def test_every_example_option_has_help_and_the_examples_use_the_public_api_only():
    import ast

    for path in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                assert any(k.arg == "help" for k in node.keywords), f"{path.name}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "adaptive_batch"
            ):
                parts = node.module.split(".")
                assert "app" not in parts and not any(p.startswith("_") for p in parts), (
                    f"{path.name}:{node.lineno} imports {node.module}: a template uses the "
                    "public API"
                )


def test_the_ddp_example_run_without_torchrun_says_how_to_launch_it(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode != 0
    assert "torchrun --nproc_per_node=2 examples/ddp_train.py" in done.stderr
    assert "RANK expected" not in done.stderr  # not torch's own error


def test_no_extra_pulls_a_newer_torch_over_an_installed_one():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's TOML reader")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    for extra, requirements in project["project"]["optional-dependencies"].items():
        for requirement in requirements:
            # torchvision and torchaudio pin the exact torch they were built for
            assert not requirement.startswith(("torchvision", "torchaudio")), (extra, requirement)
