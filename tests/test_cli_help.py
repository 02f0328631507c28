"""Every command and every option of both command lines says what it does."""

import argparse
import subprocess
import sys

import pytest

from pact_cache.cli import build_parser as cache_parser
from trainer.cli import build_eval_parser, build_parser as train_parser


def parsers():
    p = cache_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    yield "pact-cache", p
    for name, sp in sub.choices.items():
        yield f"pact-cache {name}", sp
    yield "pact-train", train_parser()
    yield "pact-eval", build_eval_parser()


@pytest.mark.parametrize("name, parser", list(parsers()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_option_has_help(name, parser):
    assert parser.description, f"{name} has no description"
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"


def test_subcommands_have_help_lines():
    p = cache_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest for c in sub._choices_actions} == {"tokens", "build", "info", "verify", "cp", "stats", "merge", "diff", "upgrade", "direction", "score"}
    assert all(c.help for c in sub._choices_actions)


def test_module_entry_points_answer_help():
    for mod in ("pact_cache", "trainer"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout
