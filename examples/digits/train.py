"""Train the digits CNN with LightningCLI and all four evalguard callbacks from a YAML file.

    python examples/digits/train.py fit --config examples/digits/config.yaml

Any value can be overridden on the command line, e.g.
``--trainer.callbacks.0.init_args.mode=subprocess`` or ``--trainer.max_epochs=5``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

# Deprecations inside Lightning's own use of jsonargparse and torch's pytree are not ours to fix:
# silenced (the jsonargparse switch is its documented one) so `python -W error` runs.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")

from lightning_evalguard.demo import DigitsClassifier, DigitsDataModule  # noqa: E402
from lightning_evalguard.lightning_cli import EvalGuardCLI  # noqa: E402

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def main(args: Sequence[str] | None = None) -> EvalGuardCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns it for tests and notebooks."""
    return EvalGuardCLI(
        DigitsClassifier,
        DigitsDataModule,
        args=list(args) if args is not None else None,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
