"""Where caches live, and how anything is written: one code path for a folder, ``file://``,
``s3://``, ``gs://``, ``hf://`` and ``memory://``, through fsspec; and the file rules every command
follows (temporary names, atomic writes, folders published whole, sha256, regular-file checks).

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

import hashlib
import json
import os
import re
import shutil
import socket
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CacheError, OutputExistsError, PactError, StorageError, preview

STORAGE_HELP = (
    "KEY=VALUE passed to the cache's fsspec filesystem, e.g. endpoint_url=http://localhost:9000 or "
    "anon=true "
    "(repeatable; values are JSON where they parse; never printed)"
)
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
            raise PactError(
                f"--storage-option {preview(item.split('=')[0])}...: use key=value, e.g. "
                f"endpoint_url=http://localhost:9000"
            )
        try:
            opts[key.strip()] = json.loads(value)
        except ValueError:
            opts[key.strip()] = value
    return opts


def redact_url(url: str) -> str:
    """``url`` without a user name or password (``http://***@host/...``): for messages."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1***@", str(url))


def check_storage_options(options: dict, where: str) -> None:
    """Refuse the storage options people mistype, before a filesystem sees them (it would fail later,
    deep inside, or send credentials in the URL): an endpoint that is not an http(s) URL or that
    carries a user name or password, and ``*_kwargs`` options that are not mappings."""
    for key, value in options.items():
        if key == "endpoint_url":
            if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
                shown = redact_url(value) if isinstance(value, str) else repr(value)
                raise StorageError(
                    f"{where}: --storage-option endpoint_url={shown}: must be an http(s) URL of the "
                    f"store, e.g. "
                    "endpoint_url=http://localhost:9000"
                )
            if re.match(r"^https?://[^/]*@", value):
                raise StorageError(
                    f"{where}: --storage-option endpoint_url={redact_url(value)}: holds a user name or "
                    f"password; "
                    "give the store's URL alone and the credentials as key=/secret= options or "
                    "AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (nothing was sent)"
                )
        elif key.endswith("_kwargs") and not isinstance(value, dict):
            raise StorageError(
                f"{where}: --storage-option {key}: must be a JSON object, e.g. "
                f'{key}=\'{{"region_name": "us-east-1"}}\', not {type(value).__name__}'
            )


def store_error(err: BaseException, options_hint: str = "--storage-option") -> str | None:
    """One line with the fix for an object store's error that reaches a command (missing credentials,
    an unknown option, an unreachable endpoint), or None when ``err`` is not one. Never prints a
    secret: option values are not shown and URLs lose their user information."""
    name, mod = type(err).__name__, type(err).__module__ or ""
    msg = str(err).splitlines()[0][:200] if str(err) else ""
    if name == "NoCredentialsError":
        return (
            "no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE), or pass "
            f"{options_hint} key=... and {options_hint} secret=...; for a public bucket, {options_hint} anon=true"
        )
    if name == "PartialCredentialsError":
        return (
            f"incomplete credentials for the object store ({msg}): give both the key and the secret "
            f"(AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or {options_hint} key=... and secret=...)"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") or (
        mod.startswith(("botocore", "aiobotocore")) and name == "HTTPClientError"
    ):
        url = re.search(r'"([^"]+)"', msg)
        return (
            f"cannot reach the object store{' at ' + redact_url(url.group(1)) if url else ''} ({name}): check "
            f"{options_hint} endpoint_url and that the server is up"
        )
    if isinstance(err, TypeError) and _raised_in_a_filesystem(err):  # not a TypeError of pact-cache's own code
        bad = re.search(r"unexpected keyword argument '([^']+)'", msg)
        if bad:
            return (
                f"unknown storage option {bad.group(1)!r}: the filesystem does not take it; check its spelling "
                f"against the "
                "filesystem's documentation (s3fs: key, secret, token, anon, endpoint_url, client_kwargs, "
                "config_kwargs, "
                "requester_pays, default_block_size, ...)"
            )
    return None


def _raised_in_a_filesystem(err: BaseException) -> bool:
    """Whether the innermost frame of ``err`` is in a filesystem or cloud-client library."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return any(
        f"{os.sep}{lib}" in where
        for lib in ("fsspec", "s3fs", "gcsfs", "adlfs", "botocore", "aiobotocore", "huggingface_hub")
    )


# ----------------------------------------------------------------------------- files


def sha256_stream(f, limit: int | None = None) -> tuple[str, int]:
    """sha256 and length of what an open binary file yields, 4 MiB at a time, never past ``limit`` bytes."""
    h, n = hashlib.sha256(), 0
    while limit is None or n < limit:
        block = f.read(1 << 22 if limit is None else min(1 << 22, limit - n))
        if not block:
            break
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def sha256_path(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)[0]


def json_bytes(obj) -> bytes:
    """How pact-cache writes JSON it publishes (manifests, states): sorted, indented, strict."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"


def tmp_name(path: Path) -> Path:
    """Where to write ``path`` before renaming it into place: hidden, and named after this host
    and process, so that a later start can tell a dead writer's leftovers from a live one's."""
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`tmp_name`'s (a writer's file on its way)."""
    return name.startswith(".") and ".tmp-" in name


def stale_tmp(p: Path) -> bool:
    """Whether ``p`` is a temporary file or folder of :func:`tmp_name` whose process has died on this host."""
    name = p.name
    if not is_tmp_name(name):
        return False
    tail = name.rsplit(".tmp-", 1)[1]
    host, _, pid = tail.rpartition("-")
    if host != _host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see half a file."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, for a message: a folder, a FIFO, or a device or socket."""
    return "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"


def read_limited(path: str | os.PathLike, limit: int, where: str, error=PactError, what: str = "file") -> bytes:
    """The bytes of a local file a user or sender handed over, at most ``limit``: refused in one line
    (``error``) when it is missing, a folder, a FIFO or device (checked on the open descriptor, opened
    without blocking, so a FIFO cannot stall the command), or larger than ``limit`` (its size and the
    limit named). At most ``limit + 1`` bytes are ever read."""
    p = Path(path).expanduser()
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{where}: no such file") from None
    except IsADirectoryError:
        raise error(f"{where}: is a folder; give the {what}") from None
    except OSError as err:
        raise error(f"{where}: cannot be read ({err.strerror or err})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{where}: is a folder; give the {what}")
        if not stat.S_ISREG(st.st_mode):
            kind = file_kind(st.st_mode)
            raise error(f"{where}: is {kind}, not a regular file; give the {what} as a file")
        if st.st_size > limit:
            raise error(
                f"{where}: is {st.st_size:,} bytes, more than the {limit:,} a {what} may hold; is it the right file?"
            )
        chunks, n = [], 0
        while n <= limit:  # at most limit + 1 bytes, whatever the file does meanwhile
            block = os.read(fd, limit + 1 - n)
            if not block:
                break
            chunks.append(block)
            n += len(block)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{where}: grew past the {limit:,} bytes a {what} may hold while it was read; refusing it")
    return data


def decode_text(data: bytes, where: str, error=PactError, what: str = "file") -> str:
    """``data`` as UTF-8 text; invalid bytes are refused in one line naming the line and byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise error(f"{where}:{line}: is not UTF-8 text (byte {err.start}); give the {what} as UTF-8 text") from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def check_regular_file(
    fs, root: str, path: str, where: str, size: int | None = None, max_size: int | None = None
) -> int:
    """Refuse anything but a regular file (a plain object) inside ``root``, without opening it.

    Symbolic links are followed only when they stay inside ``root``. Returns the file's size.
    """
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise CacheError(f"{where}: part listed in the manifest is missing; re-download or rebuild the cache") from None
    except OSError as err:
        raise CacheError(f"{where}: cannot be read ({err.strerror or err})") from None
    if is_local_fs(fs):
        real_root = os.path.realpath(root)
        if os.path.dirname(os.path.realpath(path)) != real_root:
            raise CacheError(
                f"{where}: is a link that points outside the cache folder ({os.path.realpath(path)}); "
                f"refusing to read it"
            )
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = file_kind(mode)
            raise CacheError(f"{where}: is {kind}, not a regular file; refusing to read it")
    elif info.get("type") != "file":
        raise CacheError(f"{where}: is a {info.get('type')}, not a plain object; refusing to read it")
    got = int(info.get("size") or 0)
    if size is not None and got != size:
        raise CacheError(
            f"{where}: size is {got} bytes, manifest says {size}; the part is truncated or replaced, "
            f"re-download or rebuild it"
        )
    if max_size is not None and got > max_size:
        raise CacheError(f"{where}: is {got} bytes, more than the {max_size} a manifest may hold; refusing it")
    return got


# ----------------------------------------------------------------------------- folders, published whole


def publish_dir(tmp: Path, final: Path, replace: bool = False) -> None:
    """Put the complete folder ``tmp`` at ``final`` by renaming it.

    ``replace=False``: ``final`` must not exist or be an empty folder (nothing is overwritten).
    ``replace=True``: an existing ``final`` stays whole until the new one is in place; a kill between
    the two renames leaves it as ``.{name}.old-{pid}`` (pact-train's resume looks there).
    """
    tmp, final = Path(tmp), Path(final)
    if not replace:
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()
        elif final.exists() or final.is_symlink():
            raise OutputExistsError(
                f"{final}: exists and is not an empty folder; choose another output (nothing is overwritten)"
            )
        os.rename(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path, replace: bool = False):
    """Write a folder whole or not at all: yields a hidden temporary folder beside ``final`` (what
    dead writers on this host left there is removed first); on success it is published at ``final``
    (:func:`publish_dir`), on any error it is removed and ``final`` is as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{final.name}.tmp-*"):
        if stale_tmp(old):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink(
                missing_ok=True
            )
    tmp = tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- locations


@dataclass
class Location:
    """A folder or prefix that holds (or will hold) one cache."""

    url: str
    options: dict = field(default_factory=dict, repr=False)  # may hold secrets: never printed

    def __post_init__(self):
        import fsspec

        self.url = str(self.url)
        check_storage_options(self.options, self.display)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        except (ValueError, ImportError, TypeError) as err:
            msg = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            hint = (
                " (install the filesystem's package: pip install 'pact-cache[s3]' for s3://, 'pact-cache[gcs]' for "
                "gs://)"
                if isinstance(err, ImportError)
                else ""
            )
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
            raise CacheError(
                f"{self.where(name)}: is larger than {limit} bytes (it grew while being read?); refusing it"
            )
        return data

    def open(self, name: str):
        return self.fs.open(self.path(name), "rb")

    # -- writing (each object appears whole or not at all)
    @contextmanager
    def filling(self):
        """Around a command that fills this location, found empty, with a new cache: if it fails (an
        error, Ctrl-C), what it wrote is removed again, so the location is as it was and a retry
        starts clean. (The manifest is written last, so a reader never sees a cache in between.)"""
        existed = self.exists()
        try:
            yield
        except BaseException:
            for name in self.names():
                self.remove(name)
            if self.is_local and not existed:
                shutil.rmtree(self.local_path(), ignore_errors=True)
            raise

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

        if self.is_local:
            d = tmp_name(self.local_path(".scratch"))
            d.mkdir(parents=True, exist_ok=True)
            return d
        return Path(tempfile.mkdtemp(prefix="pact-cache-upload-"))

    @staticmethod
    def drop_scratch(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)
