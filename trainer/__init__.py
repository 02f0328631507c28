"""The online side: a lean single-model PACT trainer that streams a pact-cache.

Installed under the import name ``pact_train`` (the folder is ``trainer/``): ``import pact_train``,
``python -m pact_train``. A top-level ``trainer`` would collide with PyPI's ``trainer`` package.
"""

if __name__ != "pact_train":  # imported from the repository folder under its old name
    import sys as _sys

    _why = (
        f"this package is imported as pact_train, not {__name__}: `import pact_train`, `python -m pact_train` "
        "(install the project: pip install -e .)"
    )
    if _sys.argv[:1] == ["-m"]:  # `python -m trainer`: one line, not a traceback
        raise SystemExit(f"python -m {__name__}: error: {_why}")
    raise ImportError(_why)
