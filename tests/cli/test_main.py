from click.testing import CliRunner

from cli.main import COMMANDS, main


def test_help_lists_every_command_on_one_line():
    listing = CliRunner().invoke(main, ["--help"]).output.splitlines()
    start = listing.index("Commands:")
    rows = [line.split(None, 1) for line in listing[start + 1:] if line.strip()]
    expected = {attr.replace("_", "-"): short for _, attr, short in COMMANDS}
    assert {name: text for name, text in rows} == expected  # every row is "name  one line"


def test_help_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, cli.main; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
