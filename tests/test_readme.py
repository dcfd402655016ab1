"""The README's code blocks run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write logs and checkpoints where they run
    python = blocks("python")
    assert len(python) >= 3
    namespace: dict = {"__name__": "readme"}
    for block in python:
        exec(compile(block, "README.md", "exec"), namespace)
    assert "checkpoint" in namespace and namespace["sampler"].num_feedback > 0
    assert (tmp_path / "runs" / "trajectory.csv").stat().st_size > 0
    assert list((tmp_path / "runs" / "infobatch").iterdir())  # the TensorBoard event file
    hf = namespace["trainer"]  # the Hugging Face block's, the last
    assert type(hf).__name__ == "AdaptiveBatchTrainer"
    assert hf.sampler.num_feedback == hf.state.global_step
    assert hf.sampler.num_kept < 3 * 256  # InfoBatch pruned the later epochs


def split_command(block: str) -> tuple[list[str], str]:
    """``pip install X && command`` -> (pip arguments, command)."""
    (line,) = block.strip().splitlines()
    install, command = line.split(" && ")
    words = shlex.split(install)
    assert words[:2] == ["pip", "install"], line
    return words[2:], command


def test_the_two_commands_install_this_project_and_work(tmp_path):
    (demo_pip, demo), (test_pip, tests) = (split_command(b) for b in blocks("bash"))
    assert demo_pip == [".[demo]"] and test_pip == ["-e", ".[dev]"]
    # The installs are what CI does; here the project is installed already. Run the demo as
    # written (in a scratch folder, where it writes demo-output/).
    # Console scripts install beside the interpreter, which may not be on PATH (an inactive venv).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    run = subprocess.run(
        shlex.split(demo),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": path},
    )
    assert run.returncode == 0, run.stderr
    assert (
        "trained" in run.stdout
        and "candidates" in run.stdout
        and (tmp_path / "demo-output" / "demo.png").stat().st_size > 0
    )
    assert tests == "python -m pytest"  # running it here would recurse


def test_ci_runs_the_two_commands_as_written():
    """.ci/run extracts the commands from the README itself, so a broken first command fails CI."""
    ci = (ROOT / ".ci" / "run").read_text()
    function = re.search(r"^readme_commands\(\) \{.*?^\}", ci, flags=re.DOTALL | re.MULTILINE)
    assert function is not None
    listed = subprocess.run(
        ["bash", "-c", f"{function.group(0)}\nreadme_commands"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert listed == [block.strip() for block in blocks("bash")]
    assert 'bash -euo pipefail -c "$command"' in ci
