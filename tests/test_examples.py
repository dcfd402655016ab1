"""The examples run with tiny settings (the DDP one is in test_distributed.py)."""

from __future__ import annotations

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
