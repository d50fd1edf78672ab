"""Bounded writable storage for docker sandboxes: the storage driver's quota, else tmpfs.

A sandbox must not fill the host's disk, which every tenant and Docker itself share. The
mechanism is detected once per engine, and the worker logs which one is in force:

- `quota`: overlay2 on xfs mounted with `pquota` accepts `--storage-opt size=`: the writable
  layer of the container is capped at the pool's storage size and the image is writable
  everywhere, as usual.
- `tmpfs` (every other engine): the root filesystem is read-only, and the paths images write to
  are tmpfs mounts capped at the storage size each: /tmp, /var/tmp, /run, /mnt/data, $HOME,
  and the image's WORKDIR where the image left it empty (a tmpfs would hide the application
  that images usually keep there, so a populated WORKDIR stays read-only). tmpfs lives in
  memory: what a session writes counts toward its memory limit, so it can never take more
  than that in total, and a pool that names no storage gets at most half its memory.

In both modes the image's declared VOLUMEs get a capped tmpfs too: Docker would otherwise
make each one an anonymous volume on the host's disk, outside any quota. Writing past a cap
fails with ENOSPC inside the sandbox and nothing else is affected.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from docker.errors import APIError, NotFound

from workers.docker_engine import explain
from workers.runtime import LABEL_POOL, LABEL_SCOPE

log = logging.getLogger("sessionpool.docker")

QUOTA = "quota"
TMPFS = "tmpfs"
SCRATCH = ("/tmp", "/var/tmp", "/run")  # noexec, as Docker mounts a tmpfs by default
DATA = ("/mnt/data",)  # where ACA's code interpreter keeps a session's files
LABEL_PROBE = "io.sessionpool.storage-probe"
REF_TTL_S = 30.0


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Where an image writes, read from its config and its files (once per image)."""

    home: str | None  # the image user's home, from ENV HOME or /etc/passwd
    owner: str  # tmpfs options making the image user own its mounts: ",uid=1000,gid=1000"
    workdir: str | None  # the WORKDIR, only when the image left it empty or absent
    volumes: tuple[str, ...]  # declared VOLUMEs


class Storage:
    """Detects the engine's mechanism and each image's layout; plans a sandbox's mounts."""

    def __init__(self) -> None:
        self.mechanism: str | None = None
        self._layouts: dict[str, ImageLayout] = {}  # image id → layout
        self._by_ref: dict[str, tuple[float, ImageLayout]] = {}  # reference → (when, layout)
        self._lock = threading.Lock()
        self._logged = False

    def plan(
        self,
        client: Any,
        image: str,
        size_bytes: int,
        home: str | None = None,
        owner: tuple[str, str] = ("", ""),
    ) -> dict[str, Any]:
        """The `containers.create` arguments that bound a sandbox's writable space (blocking:
        run it in a thread). `home` is the pool's own HOME variable, when it sets one; `owner` the
        (scope, pool) a probe container is labelled with.

        Raises:
            ImageNotFound: the image is not on the engine.
            DockerException: the engine refused or is unreachable (or an OSError).
        """
        layout = self._layout(client, image, owner)
        tmpfs_paths = [*layout.volumes]
        kwargs: dict[str, Any] = {}
        if self.mechanism == QUOTA:
            kwargs["storage_opt"] = {"size": str(size_bytes)}
        else:
            kwargs["read_only"] = True
            tmpfs_paths += [*SCRATCH, *DATA, home or layout.home or "/", layout.workdir or "/"]
        tmpfs = {}
        for path in tmpfs_paths:
            path = posixpath.normpath(path)
            if path == "/" or not path.startswith("/") or path in tmpfs:
                continue
            opts = "rw,nosuid,nodev" if path in SCRATCH else "rw,nosuid,nodev,exec"
            # The engine keeps the mode of the directory a tmpfs covers (`mode=` is not
            # honoured), so the image's user must own the mount to write to it.
            tmpfs[path] = f"{opts},size={size_bytes}{layout.owner}"
        if tmpfs:
            kwargs["tmpfs"] = tmpfs
        return kwargs

    def _layout(self, client: Any, image: str, owner: tuple[str, str]) -> ImageLayout:
        # A tag can be moved to another image: trust what it named for a short while only,
        # so that most creates cost no extra engine call.
        now = time.monotonic()
        cached = self._by_ref.get(image)
        if cached is not None and now - cached[0] < REF_TTL_S:
            return cached[1]
        info = client.api.inspect_image(image)
        image_id = str(info["Id"])
        with self._lock:
            if image_id not in self._layouts:
                self._layouts[image_id] = self._probe(client, image_id, info, owner)
            self._by_ref[image] = (now, self._layouts[image_id])
            return self._layouts[image_id]

    def _probe(
        self, client: Any, image_id: str, info: dict[str, Any], owner: tuple[str, str]
    ) -> ImageLayout:
        """Create (never start) a container of the image to read its files; detect quota."""
        config = info.get("Config") or {}
        kwargs: dict[str, Any] = {
            "network_disabled": True,
            # Should the worker die mid-probe, the reaper removes it as an orphan of this pool.
            "labels": {LABEL_PROBE: "1", LABEL_SCOPE: owner[0], LABEL_POOL: owner[1]},
            "entrypoint": ["/never-started"],
        }
        created = None
        if self.mechanism in (None, QUOTA) and _quota_capable(client):
            try:
                created = client.api.create_container(
                    image_id,
                    host_config=client.api.create_host_config(storage_opt={"size": "1G"}),
                    **kwargs,
                )
                self.mechanism = QUOTA
            except APIError as exc:
                log.info("storage quota refused by the engine (%s)", explain(exc))
        if created is None:
            self.mechanism = TMPFS
            created = client.api.create_container(image_id, **kwargs)
        if not self._logged:
            self._logged = True
            log.info(
                "sandbox storage: %s",
                "storage driver quota (storage_opt size)"
                if self.mechanism == QUOTA
                else "read-only root filesystem with size-capped tmpfs mounts "
                "(tmpfs counts toward the sandbox's memory limit)",
            )
        try:
            env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
            user = _user(client, created["Id"], config.get("User") or "")
            home = env.get("HOME") or user.home
            workdir = config.get("WorkingDir") or None
            if workdir and _populated(client, created["Id"], workdir):
                log.info("image %s: WORKDIR %s holds files: left read-only", image_id, workdir)
                workdir = None
            volumes = tuple(sorted(config.get("Volumes") or {}))
            for volume in volumes:
                if _populated(client, created["Id"], volume):
                    log.warning(
                        "image %s: VOLUME %s holds files that its size-capped tmpfs hides",
                        image_id,
                        volume,
                    )
            ids = f",uid={user.uid},gid={user.gid}" if user.uid else ""
            return ImageLayout(home=home, owner=ids, workdir=workdir, volumes=volumes)
        finally:
            client.api.remove_container(created["Id"], force=True)


def _quota_capable(client: Any) -> bool:
    """overlay2 on xfs may take a size (only with `pquota`, which the trial create tells)."""
    info = client.info()
    status = dict(info.get("DriverStatus") or [])
    return bool(info.get("Driver") == "overlay2" and status.get("Backing Filesystem") == "xfs")


def _read(client: Any, container: str, path: str) -> tuple[bytes, dict[str, Any]] | None:
    try:
        chunks, stat = client.api.get_archive(container, path)
    except NotFound:
        return None
    return b"".join(chunks), stat


def _populated(client: Any, container: str, path: str) -> bool:
    """Whether `path` is a directory with anything in it (a file or symlink counts as full)."""
    got = _read(client, container, path)
    if got is None:
        return False
    data, stat = got
    if stat.get("linkTarget") or not int(stat.get("mode", 0)) & (1 << 31):  # os.ModeDir
        return True
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return len(tar.getmembers()) > 1  # the directory itself, then what it holds


@dataclass(frozen=True, slots=True)
class _User:
    uid: int | None
    gid: int | None
    home: str | None


def _user(client: Any, container: str, spec: str) -> _User:
    """The image's USER (`name`, `uid`, `uid:gid`, `name:group`) as ids, with its home as
    Docker would set HOME from /etc/passwd."""
    name, _, group = spec.partition(":")
    name = name or "root"
    uid = int(name) if name.isdigit() else None
    gid = int(group) if group.isdigit() else None
    for fields in _passwd(client, container):
        if name in (fields[0], fields[2]) and fields[2].isdigit() and fields[3].isdigit():
            return _User(
                uid=int(fields[2]),
                gid=gid if gid is not None else int(fields[3]),
                home=fields[5] or None,
            )
    return _User(uid=uid, gid=gid if gid is not None else uid, home=None)


def _passwd(client: Any, container: str) -> list[list[str]]:
    got = _read(client, container, "/etc/passwd")
    if got is None:
        return []
    with tarfile.open(fileobj=io.BytesIO(got[0])) as tar:
        member = next((m for m in tar.getmembers() if m.isfile()), None)
        f = tar.extractfile(member) if member is not None else None
        text = f.read().decode(errors="replace") if f is not None else ""
    return [fields for line in text.splitlines() if len(fields := line.split(":")) >= 7]
