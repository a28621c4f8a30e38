"""Where the cgroup file systems are mounted and where this process sits in them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The controllers a job's cgroup needs; cpu is used when present (sandbox.cpu_limit_cores).
CONTROLLERS = ("memory", "pids")
CPU = "cpu"


@dataclass(frozen=True)
class Mount:
    """One cgroup file system from /proc/self/mountinfo."""

    root: str
    mount_point: str
    version: int
    # v1 only: the controllers this hierarchy carries.
    controllers: frozenset[str]


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in a mountinfo text."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        before, after = line.split(" - ", 1)
        fs_type, _source, *rest = after.split()
        options = rest[0].split(",") if rest else []
        root, mount_point = before.split()[3], before.split()[4]
        mount_point = mount_point.replace("\\040", " ")
        if fs_type == "cgroup2":
            mounts.append(Mount(root, mount_point, 2, frozenset()))
        elif fs_type == "cgroup":
            mounts.append(Mount(root, mount_point, 1,
                                frozenset(options) & {*CONTROLLERS, CPU}))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller name to cgroup path from /proc/<pid>/cgroup; "" is the v2 unified entry."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        if not names:
            paths[""] = path
        for name in names.split(","):
            if name:
                paths[name] = path
    return paths


def _under(mount: Mount, path: str) -> Path:
    # Inside a container the mount's root may be the process's own cgroup.
    relative = path
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        relative = path[len(mount.root):]
    return Path(mount.mount_point) / relative.lstrip("/")


def locate(mounts: list[Mount], paths: dict[str, str]) -> dict[str, Path]:
    """Where this process's cgroups are: "v2" and/or one entry per v1 controller."""
    found: dict[str, Path] = {}
    for mount in mounts:
        if mount.version == 2 and "" in paths:
            found.setdefault("v2", _under(mount, paths[""]))
        for controller in mount.controllers:
            if controller in paths:
                found.setdefault(controller, _under(mount, paths[controller]))
    return found
