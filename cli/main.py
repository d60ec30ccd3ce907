"""The ``kerasunet`` command. Each sub-command lives in its own module under ``cli/``."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import sys

import click

# (module, command attribute, one-line help). Command modules import TensorFlow only inside
# their functions, so `kerasunet --help`, `synth` and option errors stay fast.
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


@contextlib.contextmanager
def _stderr_fd_silenced():
    """Points file descriptor 2 at /dev/null, where C++ code writes, and restores it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs the ``tensorflow`` package's loader with fd 2 silenced (see :func:`quiet_tensorflow`)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # the real loader from here on
        with _stderr_fd_silenced():
            self.loader.exec_module(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and loads it through :class:`_QuietLoader`, once."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow() -> None:
    """Keeps TensorFlow's C++ log lines out of the output; call it before TensorFlow is imported.

    ``TF_CPP_MIN_LOG_LEVEL=3`` (a value the user set wins) hides what TensorFlow logs once
    loaded, such as the ``cuInit`` error on a machine without a GPU. The lines absl writes
    while TensorFlow's shared libraries load ("All log messages before absl::InitializeLog()
    ...", oneDNN, "Could not find cuda drivers") ignore that setting, so file descriptor 2
    points at /dev/null while the ``tensorflow`` package is first imported, whenever a
    command gets there. Python's own messages and errors are not affected.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def _forget_quiet_import() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]


class OneLineErrors(click.Group):
    """The ``kerasunet`` group: every user error, usage errors included, is one line on stderr.

    Click prints a usage error as three lines (``Usage: …``, ``Try … --help``, ``Error: …``);
    here it is ``Error: MESSAGE (see 'kerasunet CMD --help')``, with click's exit code 2.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message().rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kerasunet")
@click.option("--verbose", is_flag=True,
              help="Show TensorFlow's C++ log lines (start-up, devices, cuInit), hidden by default.")
@click.pass_context
def main(ctx: click.Context, verbose: bool):
    """Liver and liver-tumour segmentation in CT and MRI (Keras 3 U-Net, CT->MRI transfer)."""
    if not verbose:
        quiet_tensorflow()
        ctx.call_on_close(_forget_quiet_import)


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
    main(prog_name="kerasunet")
