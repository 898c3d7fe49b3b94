"""Start-up cost of lightning_evalguard, against baselines measured in the same run.

Prints, as medians over fresh interpreters:

- ``import lightning_evalguard`` and ``from lightning_evalguard import <the four callbacks>`` on top
  of an already imported ``lightning.pytorch`` (target: at most 50 ms);
- ``evalguard --help`` wall time against ``python -c pass``.

Usage: ``python benchmarks/import_time.py [--runs 7]``. Not part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

TARGET_MS = 50.0

_PROBE = r"""
import json, time
t = time.perf_counter(); import lightning.pytorch; lightning_s = time.perf_counter() - t
t = time.perf_counter(); import lightning_evalguard; package_s = time.perf_counter() - t
found, missing = [], []
t = time.perf_counter()
for name in ("GuardedEvaluation", "BufferedLogging", "ResourceCleanup", "PerformanceMonitor"):
    try:
        getattr(lightning_evalguard, name)
        found.append(name)
    except ImportError:
        missing.append(name)
callbacks_s = time.perf_counter() - t
print(json.dumps({"lightning": lightning_s, "package": package_s, "callbacks": callbacks_s,
                  "found": found, "missing": missing}))
"""


# As installed packages run: with cached bytecode. Where PYTHONDONTWRITEBYTECODE is set, every edited
# module would be compiled again on each import and the figures would measure the compiler.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_ENV)
    return time.perf_counter() - start


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per figure (default: 7)")
    args = parser.parse_args()

    probes = []
    for _ in range(args.runs + 1):  # the first one writes the bytecode caches and is not counted
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, env=_ENV
        ).stdout
        probes.append(json.loads(out.strip().splitlines()[-1]))
    probes = probes[1:]
    lightning_ms = _median_ms([p["lightning"] for p in probes])
    package_ms = _median_ms([p["package"] for p in probes])
    callbacks_ms = _median_ms([p["callbacks"] for p in probes])
    on_top_ms = _median_ms([p["package"] + p["callbacks"] for p in probes])

    # The console script installed beside this interpreter (not a version-manager shim in front of it).
    beside = os.path.join(os.path.dirname(sys.executable), "evalguard")
    script = beside if os.path.isfile(beside) else shutil.which("evalguard")
    help_cmd = [script, "--help"] if script else [sys.executable, "-m", "lightning_evalguard", "--help"]
    _wall([sys.executable, "-c", "pass"])  # warm the file cache for both
    _wall(help_cmd)
    bare_ms = _median_ms([_wall([sys.executable, "-c", "pass"]) for _ in range(args.runs)])
    help_ms = _median_ms([_wall(help_cmd) for _ in range(args.runs)])

    print(f"python {sys.version.split()[0]}, {args.runs} fresh interpreters per figure (medians), bytecode cached")
    print()
    print(f"  import lightning.pytorch (baseline)          {lightning_ms:8.1f} ms")
    print(f"  + import lightning_evalguard                 {package_ms:8.2f} ms")
    print(f"  + the callbacks ({', '.join(probes[0]['found'])})")
    print(f"                                               {callbacks_ms:8.1f} ms")
    if probes[0]["missing"]:
        print(f"    (not importable here: {', '.join(probes[0]['missing'])})")
    verdict = "within" if on_top_ms <= TARGET_MS else "OVER"
    print(
        f"  evalguard on top of lightning.pytorch        {on_top_ms:8.1f} ms "
        f"({on_top_ms / lightning_ms:.1%} of the baseline; {verdict} the {TARGET_MS:.0f} ms target)"
    )
    print()
    print(f"  python -c pass (baseline)                    {bare_ms:8.1f} ms")
    print(f"  {' '.join(['evalguard' if script else 'python -m lightning_evalguard', '--help']):<44} {help_ms:8.1f} ms")
    print(f"  ratio                                        {help_ms / bare_ms:8.2f}x")
    return 0 if on_top_ms <= TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
