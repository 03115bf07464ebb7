"""The top-level dispatcher."""

import subprocess
import sys

from unimoe.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "unimoe", "plugins", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"routers"' in proc.stdout
