"""pact_cache/cli.py: the command line over the library: a command per registered handler, usage errors and
typed errors as one line with an exit status, Locations made once at the edge."""

import pytest
from hostile import cli, one_line

from pact_cache.cli import COMMANDS, main


def test_usage_errors_are_one_line_with_status_2(capsys):
    for argv, needle in (
        ([], "the following arguments are required: COMMAND"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["info"], "the following arguments are required: CACHE"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err and "(see pact-cache" in err


def test_version_and_every_command_registered(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("pact-cache ")
    assert {
        "tokens",
        "build",
        "replay",
        "info",
        "verify",
        "stats",
        "merge",
        "filter",
        "diff",
        "cp",
        "upgrade",
        "score",
        "direction",
    } <= set(COMMANDS)


def test_a_library_error_is_one_line_naming_the_place(tmp_path, capsys):
    assert "no such cache folder" in one_line(capsys, main, "info", tmp_path / "none")
    code, lines = cli(capsys, main, "verify", tmp_path / "none")
    assert code == 1 and len(lines) == 1
