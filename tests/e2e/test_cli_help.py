"""Every command and every option of both command lines says what it does."""

import argparse
import subprocess
import sys

import pytest
from pact_train.cli import build_eval_parser
from pact_train.cli import build_parser as train_parser

from pact_cache.cli import build_parser as cache_parser


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


@pytest.mark.parametrize("name, parser", list(parsers()), ids=lambda x: x if isinstance(x, str) else "")
def test_help_renders_percent_once(name, parser):
    """Help is declared as prose and escaped for argparse in one place: a rendered "%%" is a second escape."""
    text = parser.format_help()
    assert "%%" not in text and "%(" not in text, f"{name}: {text[text.find('%') - 60 : text.find('%') + 20]!r}"


def test_every_registered_command_answers_help(capsys):
    """Each command registered beside its handler is reachable from the command line, with its help
    line in the overview and its description in its own --help."""
    from pact_cache.cli import COMMANDS, main

    with pytest.raises(SystemExit):
        main(["--help"])
    overview = capsys.readouterr().out
    for c in COMMANDS.values():
        assert c.name in overview and c.help.split()[0] in overview
        with pytest.raises(SystemExit) as e:
            main([c.name, "--help"])
        assert e.value.code == 0 and c.description.split(".")[0][:40] in " ".join(capsys.readouterr().out.split())


def test_module_entry_points_answer_help():
    for mod in ("pact_cache", "pact_train"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout


def test_every_command_answers_version(capsys):
    from pact_train.cli import main as train_main
    from pact_train.cli import main_eval

    from pact_cache import __version__
    from pact_cache.cli import main as cache_main

    for prog, main in (("pact-cache", cache_main), ("pact-train", train_main), ("pact-eval", main_eval)):
        with pytest.raises(SystemExit) as e:
            main(["--version"])
        assert e.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {__version__}"


def test_installs_beside_coquis_trainer_package(tmp_path):
    """PyPI's `trainer` (Coqui's, which TTS installs) and pact-train in one environment: a stand-in
    top-level `trainer` package on the path, and both import, from outside the repository; and the
    repository folder imported under the old name says what to import instead."""
    import os

    stand_in = tmp_path / "site" / "trainer"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("WHO = 'coqui'\n")
    code = (
        "import trainer, pact_train, pact_train.loop, pact_train.hf; assert trainer.WHO == 'coqui'; "
        "import sys; assert not [m for m in sys.modules if m == 'trainer.loop']; print('both')"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "both", out.stderr[-2000:]
    from conftest import ROOT

    old = subprocess.run([sys.executable, "-c", "import trainer"], capture_output=True, text=True, cwd=ROOT)
    assert old.returncode != 0 and "imported as pact_train" in old.stderr
