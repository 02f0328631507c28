"""pact_train/cli.py (pact-train and pact-eval): thin over TrainConfig and EvalConfig, every error one line with an
exit status. (Not test_cli.py: tests/pact_cache/test_cli.py has that name, and pytest needs unique basenames.)"""

import pytest
from pact_train.cli import build_eval_parser, build_parser, main, main_eval


@pytest.mark.parametrize("entry, prog", [(main, "pact-train"), (main_eval, "pact-eval")])
def test_version_and_missing_options(entry, prog, capsys):
    with pytest.raises(SystemExit) as e:
        entry(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"{prog} ")
    assert entry([]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: missing --model") and "give them as flags or in --config" in err
    assert err.count("\n") == 1


def test_the_parsers_are_generated_from_the_declarations():
    from dataclasses import fields

    from pact_train.config import TrainConfig
    from pact_train.evaluate import EvalConfig

    for parser, cls in ((build_parser(), TrainConfig), (build_eval_parser(), EvalConfig)):
        dests = {a.dest for a in parser._actions}
        declared = {f.name for f in fields(cls) if f.metadata.get("cli", True)}
        assert declared <= dests and "config" in dests
