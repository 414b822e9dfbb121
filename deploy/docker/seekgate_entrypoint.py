"""Container entrypoint: installs mounted secrets into the data dir as seekgate expects them, then execs the command.

Docker secrets and Kubernetes Secret volumes appear under /run/secrets with their own
owners and modes (and, in Kubernetes, as symlinks); seekgate wants regular 0600 files
in `<data_dir>/secrets/`. That directory must be a memory filesystem (tmpfs: a Compose
`tmpfs:` mount, a Kubernetes `emptyDir: {medium: Memory}`): the KEK is never written to
the disk-backed data volume, and the entrypoint refuses to start when it would be
(SEEKGATE_SECRETS_ON_DISK=1 overrides, for a host where the data dir is itself encrypted).
An existing KEK that differs from the mounted one is never overwritten: the data keys in
the store are wrapped under it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SECRETS = Path(os.environ.get("SEEKGATE_SECRETS_MOUNT", "/run/secrets"))
MOUNTINFO = Path(os.environ.get("SEEKGATE_MOUNTINFO", "/proc/self/mountinfo"))
MEMORY_FS = frozenset({"tmpfs", "ramfs"})
# mounted name -> (file name under <data_dir>/secrets, may an existing copy be replaced?)
INSTALL = {
    "seekgate_kek": ("root.key", False),
    "triton_internal_key": ("triton-internal-key", True),
}


def install(src: Path, dst: Path, replace: bool) -> None:
    data = src.read_bytes()
    if dst.exists():
        if dst.read_bytes() == data:
            return
        if not replace:
            sys.exit(f"seekgate-entrypoint: {dst} exists and differs from {src}; refusing to replace "
                     f"the key-encryption key (the stored data keys are wrapped under the existing one)")
    tmp = dst.with_name(f".{dst.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def fs_type(path: Path, mountinfo: str) -> str:
    """The filesystem type of the mount holding `path`: the longest mount point above it."""
    best, fstype = "", ""
    target = str(path.resolve())
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, line.split(" - ", 1)[1].split()[0]
    return fstype


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("seekgate-entrypoint: no command given")
    target = Path(os.environ.get("SEEKGATE_DATA_DIR", "/data")) / "secrets"
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    mounted = [(SECRETS / name, file_name, replace) for name, (file_name, replace) in INSTALL.items()
               if (SECRETS / name).is_file()]
    if mounted and os.environ.get("SEEKGATE_SECRETS_ON_DISK") != "1":
        kind = fs_type(target, MOUNTINFO.read_text())
        if kind not in MEMORY_FS:
            sys.exit(f"seekgate-entrypoint: {target} is on {kind or 'an unknown filesystem'}, not tmpfs; refusing "
                     f"to copy the key-encryption key to disk. Mount a tmpfs there (deploy/README.md)")
    for src, file_name, replace in mounted:
        install(src, target / file_name, replace)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
