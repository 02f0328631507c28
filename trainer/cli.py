"""``pact-train``: a thin command line over :func:`pact_train.loop.train`."""

from __future__ import annotations

import argparse
import os
import sys

from pact_cache.cliutil import OneLineParser, run_command
from pact_cache.errors import PactError

from .config import parse_config
from .loop import train


def build_parser() -> argparse.ArgumentParser:
    """pact-train's parser (generated from :class:`pact_train.config.TrainConfig`)."""
    from .config import build_parser as generated

    return generated(OneLineParser)


def main(argv: list[str] | None = None) -> int:
    prog = "pact-train"
    if os.environ.get("WORLD_SIZE", "1").strip() not in (
        "",
        "0",
        "1",
    ):  # under torchrun / accelerate launch: name the rank
        prog = f"pact-train[rank {os.environ.get('RANK', '?')}]"
    return run_command(
        prog,
        lambda _: _train(parse_config(argv, OneLineParser)),
        None,
        "interrupted; continue with --resume from the last checkpoint",
    )


def _train(cfg) -> int:
    import torch.distributed

    try:
        res = train(cfg)
    except torch.distributed.DistError as err:  # a peer process stopped: its own line says why
        raise PactError(
            f"another process of this job stopped ({type(err).__name__}: "
            f"{(str(err).splitlines() or [''])[0][:120]}); "
            "see its message above, then rerun with --resume"
        ) from None
    if res.get("dry_run"):  # the estimate is printed; nothing was written
        return 0
    if res.get("main", True):
        print(f"{res['out']}: {res['steps']} steps in {res['seconds']:.0f}s; weights in {res['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def build_eval_parser():
    from .evaluate import build_eval_parser as build

    return build(OneLineParser)


def main_eval(argv: list[str] | None = None) -> int:
    return run_command("pact-eval", _eval, argv, "interrupted; nothing was written")


def _eval(argv) -> int:
    import json

    from .evaluate import evaluate, parse_eval_config

    print(json.dumps(evaluate(parse_eval_config(argv, OneLineParser)), indent=2))
    return 0
