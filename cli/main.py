"""The ``kerasunet`` command. Each sub-command lives in its own module under ``cli/``."""

from __future__ import annotations

import importlib
import os

import click

# (module, command attribute, one-line help). Command modules import TensorFlow only inside
# their functions, so `kerasunet --help` stays fast.
COMMANDS = [
    ("cli.synth", "synth", "Write CT (LiTS) and MRI (FZMC) phantoms in real layouts."),
    ("cli.records", "build_records", "Validate NIfTI cases, write sharded TFRecords + manifest."),
    ("cli.records", "inspect_records", "Summarise a records folder and verify its checksums."),
    ("cli.train", "train", "Train a U-Net: scratch, init or freeze (CT->MRI transfer)."),
    ("cli.predict", "predict", "Segment volumes into NIfTI masks (local or TF Serving)."),
    ("cli.evaluate", "evaluate", "LiTS metrics, report and overlays on held-out cases."),
    ("cli.export", "export", "Write a versioned SavedModel for TF Serving."),
    ("cli.experiment", "experiment", "Run the CT->MRI transfer experiment end to end."),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kerasunet")
def main():
    """Liver and liver-tumour segmentation in CT and MRI (Keras 3 U-Net, CT->MRI transfer)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


for _module, _attr, _short_help in COMMANDS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise
        continue
    _command = getattr(_mod, _attr)
    _command.short_help = _short_help  # one line each in `kerasunet --help`
    main.add_command(_command)


if __name__ == "__main__":
    main()
