"""pact_cache/cliutil.py: what the command lines share: one-line usage errors, the runner that turns every
error into one line and an exit status, the shared argument types."""

import argparse

import pytest

from pact_cache.cliutil import OneLineParser, positive_int, run_command
from pact_cache.errors import CacheError


def test_a_usage_error_is_one_line_with_the_value_cut_short(capsys):
    p = OneLineParser(prog="tool")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "9" * 10_000])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and len(err) < 300
    assert err.startswith("tool: error: argument --n: invalid int value: '999") and "(see tool --help)" in err


def test_positive_int():
    assert positive_int("3") == 3
    for bad, needle in (
        ("0", "0 must be at least 1"),
        ("2147483648", "2147483648 must be at most 2,147,483,647"),
        ("9" * 100, "must be at most 2,147,483,647"),
        ("x", "'x' is not an integer"),
        ("7" * 200, "is not an integer"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=needle):
            positive_int(bad) if bad != "7" * 200 else positive_int(bad + "x")


def test_the_runner_turns_every_error_into_one_line(capsys):
    def fails(exc):
        def fn(_):
            raise exc

        return fn

    assert run_command("tool", lambda _: 0, None, "stopped") == 0
    assert run_command("tool", fails(CacheError("c: damaged; rebuild it")), None, "stopped") == 1
    assert capsys.readouterr().err == "tool: error: c: damaged; rebuild it\n"
    assert run_command("tool", fails(KeyboardInterrupt()), None, "stopped; nothing written") == 130
    assert capsys.readouterr().err == "tool: stopped; nothing written\n"
    err = FileNotFoundError(2, "No such file or directory", "/x/y")
    assert run_command("tool", fails(err), None, "stopped") == 1
    assert "tool: error: /x/y: No such file or directory; check the path" in capsys.readouterr().err
    assert run_command("tool", fails(ZeroDivisionError("boom\nmore")), None, "stopped") == 1
    line = capsys.readouterr().err
    assert (
        line.startswith("tool: internal error: ZeroDivisionError: boom (a bug in pact-cache") and line.count("\n") == 1
    )
