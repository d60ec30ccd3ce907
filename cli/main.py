"""The ``kerasunet`` command. Each sub-command lives in its own module under ``cli/``."""

from __future__ import annotations

import importlib
import os

import click

# (module, command attribute): imported lazily so `kerasunet --help` stays fast and a
# command is listed only once its module exists.
COMMANDS = [
    ("cli.synth", "synth"),
    ("cli.records", "build_records"),
    ("cli.records", "inspect_records"),
    ("cli.train", "train"),
    ("cli.predict", "predict"),
    ("cli.evaluate", "evaluate"),
    ("cli.export", "export"),
    ("cli.experiment", "experiment"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="kerasunet")
def main():
    """Liver and liver-tumour segmentation in CT and MRI (Keras 3 U-Net, CT->MRI transfer)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


for _module, _attr in COMMANDS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise
        continue
    main.add_command(getattr(_mod, _attr))


if __name__ == "__main__":
    main()
