"""The `evalguard` console script: version, usage errors (exit 2, one line), report and replay paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_evalguard import __version__
from lightning_evalguard.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"evalguard {__version__}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "missing.json"], "no such file: 'missing.json'"),
        (["replay", "missing_dir", "--project", "p"], "no such directory: 'missing_dir'"),
        (["replay", "."], "the following arguments are required: --project"),
        (["demo", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["demo", "--mode", "threads"], "invalid choice: 'threads'"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("evalguard")
    assert message in err[0]


def test_a_report_that_is_not_a_report_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "report.json"
    bad.write_text("{not json")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("evalguard report: error:")


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "evalguard"
    proc = subprocess.run([str(exe) if exe.exists() else "evalguard", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert __version__ in proc.stdout
