"""The package's shape: tools for finished runs never load the training loop."""

from __future__ import annotations

import subprocess
import sys

TRAINING = ("cifar_transfer.training.run", "cifar_transfer.training.loop", "cifar_transfer.training.runlog",
            "cifar_transfer.training.probe", "cifar_transfer.training.optim", "cifar_transfer.training.distributed")


def test_evaluate_report_export_predict_import_nothing_from_training():
    code = (
        "import sys\n"
        "import cifar_transfer.results.runs, cifar_transfer.results.report, cifar_transfer.results.export, "
        "cifar_transfer.results.predict\n"
        f"print(sorted(m for m in {TRAINING!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_listing_recipes_imports_no_torch():
    code = "import sys, cifar_transfer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
