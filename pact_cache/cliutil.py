"""What the command lines share (pact-cache, pact-train, pact-eval): a parser whose usage errors are
one line, the runner that turns every error into one line and an exit status, and the options that
several commands take alike."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import OutputExistsError, PactError, preview
from .storage import STORAGE_HELP


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {preview(text)}: use i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


INT_MAX = 2**31 - 1  # the largest count an option takes (pact-train's ranges alike)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{preview(text)} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    if v > INT_MAX:  # a count, a size or a length: past this it overflows torch, numpy or Arrow, not a use
        raise argparse.ArgumentTypeError(f"{preview(v)} must be at most {INT_MAX:,}")
    return v


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where to look) and exit status 2."""

    def error(self, message):
        import re

        # argparse quotes the value it could not read: a value of any length is shown cut short
        message = re.sub(r"'([^']{60})[^']+'", r"'\1...'", message)[:500]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(prog: str, fn, args, interrupted: str) -> int:
    """Run one command; every error becomes one line on stderr and a non-zero exit status.

    Typed errors carry their own message. An OSError (a read-only folder, a full disk) names the
    file and the system's reason. Anything else is a bug: one line says so, and
    ``PACT_CACHE_DEBUG=1`` shows the traceback.
    """
    import os

    try:
        return fn(args)
    except PactError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"{prog}: error: {where}{err.strerror or err}; check the path, its permissions and free space",
            file=sys.stderr,
        )
        return 1
    except Exception as err:
        from .storage import store_error

        line = store_error(err)  # an object store's error: missing credentials, a mistyped option, no server
        if line is not None and not os.environ.get("PACT_CACHE_DEBUG"):
            print(f"{prog}: error: {line}", file=sys.stderr)
            return 1
        if os.environ.get("PACT_CACHE_DEBUG"):
            raise
        msg = str(err).splitlines()[0][:200] if str(err) else ""
        print(
            f"{prog}: internal error: {type(err).__name__}: {msg} (a bug in pact-cache; rerun with "
            f"PACT_CACHE_DEBUG=1 "
            "for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


def new_file(path: str, example: str) -> Path:
    """``-o FILE`` of a command that writes one file: refused when it exists (nothing is overwritten)."""
    out = Path(path)
    if out.is_dir():
        raise PactError(f"-o {out}: is a folder; give a file name such as {example}")
    if out.exists() or out.is_symlink():
        raise OutputExistsError(f"-o {out}: exists; choose another name or delete it (nothing is overwritten)")
    return out


# ----------------------------------------------------------------------------- shared options


def add_version(p: argparse.ArgumentParser) -> None:
    """``--version``: the program's name and pact-cache's version (one package, one version)."""
    from . import __version__

    p.add_argument("--version", action="version", version=f"{p.prog} {__version__}")


def add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=STORAGE_HELP)


def add_cache_id(p: argparse.ArgumentParser, what: str = "the cache") -> None:
    p.add_argument(
        "--cache-id", metavar="ID", help=f"refuse {what} unless its content id is ID (or starts with it, 8+ characters)"
    )


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_dtype_device(p: argparse.ArgumentParser, dtype_help: str = "auto: fp32 on CPU, bf16 on CUDA") -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help=dtype_help)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def add_quantize(p: argparse.ArgumentParser, help: str, default: str | None = "none") -> None:
    """``--quantize none|nf4|int8`` (bitsandbytes; pact_cache.models.QUANTIZE)."""
    from .models import QLORA_EXTRA, QUANTIZE

    p.add_argument("--quantize", default=default, choices=list(QUANTIZE), help=f"{help} (needs {QLORA_EXTRA})")


def add_json(p: argparse.ArgumentParser, what: str = "print JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)


def add_output(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    p.add_argument("-o", "--output", required=True, metavar=metavar, help=help)
