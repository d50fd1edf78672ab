"""The session's files under the data directory: name checks, listing, streamed uploads."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import mimetypes
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from aiohttp import BodyPartReader

from .errors import FileNotFoundApiError, InvalidFileNameError, UploadTooLargeError

# The path clients use for the data directory; stripped from names and `path` values.
CLIENT_ROOT = "/mnt/data"
# Besides Unicode letters and digits (ACA "Supported characters").
_ALLOWED_PUNCTUATION = frozenset("-_ .@$&=;,#%^()")
_MAX_SEGMENT_BYTES = 255
_CHUNK_BYTES = 256 * 1024
_TEMP_PREFIX = ".upload-"
_FILENAME_EXTENDED = re.compile(r"(?:^|;)\s*filename\*\s*=\s*([^;]+)", re.IGNORECASE)
_FILENAME_QUOTED = re.compile(r'(?:^|;)\s*filename\s*=\s*"((?:[^"\\]|\\.)*)"', re.IGNORECASE)
_FILENAME_TOKEN = re.compile(r'(?:^|;)\s*filename\s*=\s*([^";\s]+)', re.IGNORECASE)


@dataclass(frozen=True)
class FileEntry:
    """What the API tells about one file or directory."""

    name: str
    directory: str  # relative to the data directory, "" at the top
    is_dir: bool
    size: int
    modified: dt.datetime
    content_type: str

    @property
    def modified_rfc3339(self) -> str:
        return self.modified.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FileStore:
    """Files of this session; every path that reaches the disk went through `resolve`."""

    def __init__(self, root: Path, max_upload_bytes: int) -> None:
        self.root = root
        self.max_upload_bytes = max_upload_bytes

    def resolve(self, name: str, directory: str | None = None) -> Path:
        """The path of `name` inside `directory` (both client-supplied).

        Raises:
            InvalidFileNameError: a disallowed character, an empty or `.`/`..` segment, or a
                path that leaves the data directory (including through a symlink).
        """
        parts = [*_segments(directory or "", allow_empty=True), *_segments(name)]
        return self._inside(self.root.joinpath(*parts))

    def resolve_dir(self, directory: str | None) -> Path:
        """The data directory or a subdirectory of it (see `resolve`)."""
        return self._inside(self.root.joinpath(*_segments(directory or "", allow_empty=True)))

    def _inside(self, path: Path) -> Path:
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise InvalidFileNameError("The path points outside the data directory.")
        return path

    def entry(self, path: Path) -> FileEntry:
        """Metadata of an existing file or directory.

        Raises:
            FileNotFoundApiError: nothing is there.
        """
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise FileNotFoundApiError(f"File '{self._relative(path)}' was not found.") from exc
        is_dir = path.is_dir()
        content_type = (
            "application/octet-stream"
            if is_dir
            else mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        parent = self._relative(path.parent)
        return FileEntry(
            name=path.name,
            directory="" if parent == "." else parent,
            is_dir=is_dir,
            size=st.st_size,
            modified=dt.datetime.fromtimestamp(st.st_mtime, tz=dt.UTC),
            content_type=content_type,
        )

    def existing_file(self, path: Path) -> Path:
        """`path` if it is a regular file.

        Raises:
            FileNotFoundApiError: missing, or a directory.
        """
        if not path.is_file():
            raise FileNotFoundApiError(f"File '{self._relative(path)}' was not found.")
        return path

    async def list_dir(
        self, directory: Path, *, recursive: bool, files_only: bool
    ) -> list[FileEntry]:
        """Entries of `directory`, sorted by path; the walk runs off the event loop.

        Raises:
            FileNotFoundApiError: `directory` does not exist.
        """
        return await asyncio.to_thread(self._list, directory, recursive, files_only)

    def _list(self, directory: Path, recursive: bool, files_only: bool) -> list[FileEntry]:
        if not directory.is_dir():
            raise FileNotFoundApiError(f"Directory '{self._relative(directory)}' was not found.")
        found = directory.rglob("*") if recursive else directory.iterdir()
        entries = []
        for path in sorted(found):
            if path.is_symlink() or (files_only and not path.is_file()):
                continue
            if path.name.startswith(_TEMP_PREFIX):  # an upload in progress
                continue
            with contextlib.suppress(FileNotFoundApiError):  # deleted while we looked
                entries.append(self.entry(path))
        return entries

    async def save(self, part: BodyPartReader, target: Path) -> FileEntry:
        """Stream one multipart part to `target`, creating parent directories.

        The file appears atomically: it is written under a temporary name and renamed.

        Raises:
            UploadTooLargeError: the part exceeds the upload cap (nothing is kept).
            InvalidFileNameError: `target` is an existing directory.
        """
        await asyncio.to_thread(self._prepare_target, target)
        temp = target.parent / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        size = 0
        try:
            with temp.open("wb") as out:
                while chunk := await part.read_chunk(_CHUNK_BYTES):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise UploadTooLargeError(
                            f"The file exceeds the upload limit of {self.max_upload_bytes} bytes."
                        )
                    out.write(chunk)
            temp.replace(target)
        finally:
            temp.unlink(missing_ok=True)
        return self.entry(target)

    def _prepare_target(self, target: Path) -> None:
        if target.is_dir():
            raise InvalidFileNameError(f"'{self._relative(target)}' is a directory.")
        target.parent.mkdir(parents=True, exist_ok=True)

    def delete(self, path: Path) -> None:
        """Delete a file, or a directory with everything in it.

        Raises:
            FileNotFoundApiError: nothing is there.
            InvalidFileNameError: `path` is the data directory itself.
        """
        if path == self.root:
            raise InvalidFileNameError("The data directory itself cannot be deleted.")
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError as exc:
            raise FileNotFoundApiError(f"File '{self._relative(path)}' was not found.") from exc

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))


def _segments(raw: str, *, allow_empty: bool = False) -> list[str]:
    """Split a client-supplied relative path, checking every segment.

    Raises:
        InvalidFileNameError: see `FileStore.resolve`.
    """
    if "\x00" in raw:
        raise InvalidFileNameError("File names cannot contain NUL.")
    name = raw
    if name == CLIENT_ROOT or name.startswith(CLIENT_ROOT + "/"):
        name = name[len(CLIENT_ROOT) :].lstrip("/")
    if not name:
        if allow_empty:
            return []
        raise InvalidFileNameError("A file name is required.")
    if name.startswith("/"):
        raise InvalidFileNameError(f"Absolute paths outside {CLIENT_ROOT} are not allowed.")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidFileNameError(f"'{raw}' has an empty, '.' or '..' path segment.")
        if len(part.encode()) > _MAX_SEGMENT_BYTES:
            raise InvalidFileNameError("File names are limited to 255 bytes per segment.")
        bad = sorted({c for c in part if not (c.isalnum() or c in _ALLOWED_PUNCTUATION)})
        if bad:
            raise InvalidFileNameError(
                f"'{raw}' contains characters that are not allowed: {''.join(bad)!r}. Allowed: "
                "letters, digits, spaces and - _ . @ $ & = ; , # % ^ ( )"
            )
    return parts


def multipart_filename(content_disposition: str) -> str | None:
    """The file name of a multipart part, exactly as the client sent it.

    aiohttp's own parser strips leading slashes, which would turn `/etc/x` into an innocent
    `etc/x` and hide the `/mnt/data/` prefix clients send. Percent-escapes are decoded:
    newer aiohttp clients percent-encode the whole name (`%2Fmnt%2Fdata%2Fa%20b.txt`), and
    HTML5 clients (requests) encode quotes and newlines that way.
    """
    if match := _FILENAME_EXTENDED.search(content_disposition):
        charset, _, rest = match.group(1).strip().partition("'")
        encoded = rest.partition("'")[2]
        try:
            return unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except LookupError:  # an unknown charset name
            return unquote(encoded, errors="replace")
    if match := _FILENAME_QUOTED.search(content_disposition):
        return unquote(re.sub(r"\\(.)", r"\1", match.group(1)))
    if match := _FILENAME_TOKEN.search(content_disposition):
        return unquote(match.group(1))
    return None
