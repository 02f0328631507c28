"""pact-cache: run an aligned reference model once, offline, and cache what PACT's loss needs."""

__version__ = "0.1.0"

from .errors import CacheError, DatasetError, ModelError, OutputExistsError, PactError, TokensError  # noqa: E402
from .format import Cache, CacheRow, open_cache  # noqa: E402
from .manifest import Encoding, Manifest, SafetyTokens  # noqa: E402

__all__ = [
    "Cache",
    "CacheRow",
    "open_cache",
    "Manifest",
    "SafetyTokens",
    "Encoding",
    "PactError",
    "CacheError",
    "DatasetError",
    "ModelError",
    "OutputExistsError",
    "TokensError",
    "__version__",
]
