"""The seccomp filter bubblewrap loads for every job: what container runtimes deny, denied."""

from __future__ import annotations

import errno
import os
import tempfile
from functools import cache

# System calls an unprivileged job has no use for, after Docker's and Podman's default
# profiles: namespaces and mounts (a way back to capabilities), kernel modules and kexec,
# other processes' memory, the kernel keyring, BPF, perf, clocks, swap and accounting.
DENIED = (
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "name_to_handle_at", "open_by_handle_at", "lookup_dcookie",
    "acct", "quotactl", "reboot", "swapon", "swapoff", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "stime",
    "iopl", "ioperm", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl",
    "vm86", "vm86old",
)
# clone() flags that make a namespace (linux/sched.h); plain forks and threads stay allowed.
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080,
}


class SeccompUnavailableError(RuntimeError):
    """libseccomp or its Python bindings cannot be loaded."""


@cache
def program() -> bytes:
    """The filter as a BPF program, built once with libseccomp."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as exc:
        raise SeccompUnavailableError(
            f"cannot load libseccomp ({exc}); install libseccomp2 and the pyseccomp "
            "package (scripts/setup.sh does both)") from exc
    deny = seccomp.ERRNO(errno.EPERM)
    # Any other architecture's calling convention (32-bit int 0x80 on x86_64) kills.
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED:
        try:
            rules.add_rule(deny, name)
        except (ValueError, OSError):
            # A name this kernel's architecture does not have: there is nothing to deny.
            continue
    # The flags argument is the first on every architecture this runs on but s390.
    for flag in NAMESPACE_FLAGS.values():
        rules.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes glibc fall back
    # to clone, which the rules above do check.
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as file:
        rules.export_bpf(file)
        file.seek(0)
        return file.read()


def program_fd() -> int:
    """A fresh file descriptor holding the program at offset 0, for `bwrap --seccomp FD`."""
    data = program()
    # One per job: bubblewrap reads to the end, so jobs cannot share an offset.
    fd = os.memfd_create("kowalski-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd
