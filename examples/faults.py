"""Evaluation that hangs, and evaluation that crashes its process: training goes on either way.

    python examples/faults.py [--out DIR]

Two short runs of the digits demo model, with fault injectors from ``lightning_evalguard.testing``:

1. ``mode="stream"``: the first evaluation hangs in a loop. At ``timeout`` it is declared timed
   out, cancelled inside its thread, and the next epochs' evaluations run normally.
2. ``mode="subprocess"``: the first evaluation segfaults its worker process. The death is seen at
   once, a new worker takes over (the warm spare, once one is up), and the next evaluations succeed.

Each run prints what GuardedEvaluation counted; the script exits non-zero if a fault was not
contained as described.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

from lightning.pytorch import Trainer, seed_everything

from lightning_evalguard import EvalGuardWarning, GuardedEvaluation
from lightning_evalguard.demo import DigitsClassifier, DigitsDataModule
from lightning_evalguard.testing import CrashingEval, FaultyValidation, HangingEval


class HangingDigits(FaultyValidation, DigitsClassifier):
    """The demo model; its first evaluation hangs (the fault is armed once, through a file)."""


class CrashingDigits(FaultyValidation, DigitsClassifier):
    """The demo model; its first evaluation segfaults the process it runs in."""


def run(title: str, model: DigitsClassifier, guard: GuardedEvaluation, epochs: int) -> dict[str, float | int]:
    print(f"\n== {title}")
    trainer = Trainer(max_epochs=epochs, callbacks=[guard], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EvalGuardWarning)
        trainer.fit(model, datamodule=DigitsDataModule())
    stats = guard.stats()
    print(f"training finished: {trainer.current_epoch} epochs in {time.perf_counter() - start:.1f}s")
    for key in ("submitted", "completed", "timed_out", "failed", "respawns"):
        if key in stats:
            print(f"  {key:<10} {stats[key]}")
    for w in caught:
        if issubclass(w.category, EvalGuardWarning):
            print(f"  warning: {str(w.message).splitlines()[0]}")
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description="GuardedEvaluation containing a hang and a crash")
    parser.add_argument("--out", default=None, help="directory for the faults' once-files (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="evalguard-faults-")
    os.makedirs(out, exist_ok=True)
    seed_everything(0, verbose=False)

    hanging = HangingDigits()
    hanging.validation_fault = HangingEval(seconds=None, once_file=os.path.join(out, "hang-once"))
    hang = run("a hanging evaluation (stream mode, timeout=2s)", hanging,
               GuardedEvaluation(mode="stream", timeout=2.0, max_pending=3), epochs=4)

    crashing = CrashingDigits()
    crashing.validation_fault = CrashingEval("segfault", once_file=os.path.join(out, "crash-once"))
    crash = run("a segfaulting evaluation (subprocess mode)", crashing,
                GuardedEvaluation(mode="subprocess", warm_start=True, timeout=120.0, max_pending=4,
                                  final_timeout=120.0), epochs=4)

    contained = (hang["timed_out"] == 1 and hang["completed"] == hang["submitted"] - 1 >= 2
                 and crash["failed"] == 1 and crash["completed"] == crash["submitted"] - 1 >= 2
                 and crash["respawns"] >= 1)
    print("\nboth faults contained: training finished, later evaluations succeeded" if contained
          else "\nUNEXPECTED: a fault was not contained as described")
    return 0 if contained else 1


if __name__ == "__main__":
    raise SystemExit(main())
