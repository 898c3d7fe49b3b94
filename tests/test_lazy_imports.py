"""Start-up stays cheap: each check runs in a fresh interpreter and looks at what got imported."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import lightning_evalguard

HEAVY = ("lightning", "torch", "wandb", "matplotlib", "psutil")


def imported_after(code: str) -> set[str]:
    """Top-level names of the HEAVY packages in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1])) & set(HEAVY)


def test_importing_the_package_imports_none_of_the_heavy_libraries() -> None:
    assert imported_after("import lightning_evalguard; lightning_evalguard.__version__") == set()


def test_the_engine_never_imports_lightning() -> None:
    engine = importlib.import_module("lightning_evalguard.engine")
    names = sorted(m.name for m in pkgutil.walk_packages(engine.__path__, "lightning_evalguard.engine."))
    assert "lightning_evalguard.engine.sla" in names
    loaded = imported_after("import importlib\n" + "\n".join(f"importlib.import_module({n!r})" for n in names))
    assert "lightning" not in loaded


@pytest.mark.parametrize(
    "module",
    ["clock", "breaker", "events", "sla", "steptimer", "memory", "figures"],
)
def test_tensor_free_engine_modules_import_neither_torch_nor_psutil(module: str) -> None:
    assert imported_after(f"import lightning_evalguard.engine.{module}") == set()


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["demo", "--help"], ["replay", "--help"]])
def test_cli_help_does_not_import_torch(argv: list[str]) -> None:
    # -X importtime lists every module the real console entry point imports.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_evalguard", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: evalguard" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY)


def test_the_report_module_imports_matplotlib_only_to_draw() -> None:
    assert imported_after("import lightning_evalguard.report") == set()


def test_using_the_callbacks_adds_neither_wandb_nor_matplotlib_to_what_lightning_imports() -> None:
    # Lightning itself may pull matplotlib in (through torch and sympy): only our additions count.
    baseline = imported_after("import lightning.pytorch")
    loaded = imported_after(
        "from lightning_evalguard import PerformanceMonitor, ResourceCleanup\nPerformanceMonitor(); ResourceCleanup()"
    )
    assert {"lightning", "torch"} <= loaded
    assert not (loaded - baseline) & {"wandb", "matplotlib"}


@pytest.mark.parametrize(
    "module",
    [
        "lightning_evalguard",
        "lightning_evalguard.testing",
        "lightning_evalguard.report",
        "lightning_evalguard.callbacks.cleanup",
        "lightning_evalguard.callbacks.monitor",
        "lightning_evalguard.engine.sla",
        "lightning_evalguard.engine.steptimer",
        "lightning_evalguard.engine.figures",
        "lightning_evalguard.engine.memory",
    ],
)
def test_all_is_sorted_and_every_name_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    if module == "lightning_evalguard":
        assert mod.__all__ == sorted(mod.__all__)  # the public contract: plainly sorted
    else:  # ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical
        kind = lambda name: 0 if name.isupper() else 1 if name[:1].isupper() else 2  # noqa: E731
        assert mod.__all__ == sorted(mod.__all__, key=lambda name: (kind(name), name))
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_the_lazy_table_and_all_agree() -> None:
    assert sorted(lightning_evalguard._LAZY) == sorted(set(lightning_evalguard.__all__) - {"__version__"})
