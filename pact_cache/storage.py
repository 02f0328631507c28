"""Where caches live: one code path for a folder, ``file://``, ``s3://``, ``gs://``, ``hf://`` and
``memory://``, through fsspec.

A :class:`Location` is a cache's folder (or bucket prefix). Objects are written whole: on a local
disk through a temporary file renamed into place, on an object store by one upload, which the store
makes visible only once complete (S3 completes a multipart upload atomically). So a reader never
sees half an object, and since the manifest is written last, never half a cache.

Credentials and endpoints come the usual fsspec ways: the environment (``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``, ``HF_TOKEN``, ...), fsspec's config files, or ``--storage-option key=value``
(for example ``endpoint_url=http://localhost:9000``). Options are passed to the filesystem and
never printed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CacheError, PactError

COPY_BLOCK = 8 << 20  # bytes read and written at a time when streaming an object


def is_local_fs(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def parse_storage_options(items: list[str] | None) -> dict:
    """``["endpoint_url=http://...", "anon=true"]`` -> ``{"endpoint_url": "http://...", "anon": True}``.
    Values that parse as JSON (numbers, booleans, null, objects) are taken as such, others as strings."""
    opts: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PactError(f"--storage-option {item.split('=')[0]!r}...: use key=value, e.g. endpoint_url=http://localhost:9000")
        try:
            opts[key.strip()] = json.loads(value)
        except ValueError:
            opts[key.strip()] = value
    return opts


@dataclass
class Location:
    """A folder or prefix that holds (or will hold) one cache."""

    url: str
    options: dict = field(default_factory=dict, repr=False)  # may hold secrets: never printed

    def __post_init__(self):
        import fsspec

        self.url = str(self.url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        except (ValueError, ImportError, TypeError) as err:
            msg = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            hint = (" (install the filesystem's package: pip install 'pact-cache[s3]' for s3://, 'pact-cache[gcs]' for gs://)"
                    if isinstance(err, ImportError) else "")
            raise CacheError(f"{self.display}: cannot open this location: {msg}{hint}") from None
        self.root = root.rstrip("/") or "/"

    @classmethod
    def of(cls, where: Location | str | os.PathLike, options: dict | None = None) -> Location:
        """``where`` itself if it is a Location, else a Location of its URL or path (with ``options``)."""
        return where if isinstance(where, Location) else cls(str(where), options or {})

    @property
    def display(self) -> str:
        """The URL as the user typed it, without a trailing slash (never the options)."""
        return self.url.rstrip("/") or self.url

    @property
    def is_local(self) -> bool:
        return is_local_fs(self.fs)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def where(self, name: str) -> str:
        return f"{self.display}/{name}"

    def local_path(self, name: str = "") -> Path:
        assert self.is_local
        return Path(self.root) / name if name else Path(self.root)

    # -- reading
    def exists(self, name: str | None = None) -> bool:
        try:
            return bool(self.fs.exists(self.path(name) if name else self.root))
        except OSError as err:
            raise CacheError(f"{self.where(name) if name else self.display}: cannot be read ({err})") from None

    def is_dir(self) -> bool:
        try:
            return self.fs.isdir(self.root)
        except OSError:
            return False

    def names(self) -> list[str]:
        """Names of the objects directly inside (files only)."""
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise CacheError(f"{self.display}: cannot be listed ({err})") from None
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")

    def read_bytes(self, name: str, limit: int) -> bytes:
        with self.fs.open(self.path(name), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CacheError(f"{self.where(name)}: is larger than {limit} bytes (it grew while being read?); refusing it")
        return data

    def open(self, name: str):
        return self.fs.open(self.path(name), "rb")

    # -- writing (each object appears whole or not at all)
    def makedirs(self) -> None:
        if self.is_local:
            self.local_path().mkdir(parents=True, exist_ok=True)
        else:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except OSError:
                pass  # object stores have no folders; a missing bucket shows up on the first write

    def put_bytes(self, name: str, data: bytes) -> None:
        if self.is_local:
            from .format import atomic_write_bytes

            atomic_write_bytes(self.local_path(name), data)
        else:
            self.fs.pipe_file(self.path(name), data)

    def put_file(self, local: Path, name: str) -> None:
        """Publish a finished local file under ``name`` (moved on a local disk, uploaded elsewhere)."""
        if self.is_local:
            os.replace(local, self.local_path(name))
        else:
            self.fs.put_file(str(local), self.path(name))
            Path(local).unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def scratch(self) -> Path:
        """A local folder for files on their way to this location (a hidden temp folder inside a
        local cache, so that the final rename stays on one filesystem; a system temp folder otherwise)."""
        import tempfile

        from .format import tmp_name

        if self.is_local:
            d = tmp_name(self.local_path(".scratch"))
            d.mkdir(parents=True, exist_ok=True)
            return d
        return Path(tempfile.mkdtemp(prefix="pact-cache-upload-"))

    @staticmethod
    def drop_scratch(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)
