"""The languages jobs can use: how each toolchain is found, placed in the sandbox and run."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from kowalski.agent.snippets import JAVA_MAIN_CLASS, Program, java_program, rust_program
from kowalski.common.config import SandboxConfig
from kowalski.common.errors import ConfigError
from kowalski.common.messages import LANGUAGES

# Searched for interpreters instead of the agent's own PATH: the agent may run from a
# virtualenv or a home directory the unprivileged job user cannot read.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# Toolchains the job user cannot reach at their own path are bound read-only under here.
TOOLCHAIN_MOUNT = "/run/toolchains"
# What bwrap mode shows a job of the host, read-only; a toolchain elsewhere is bound in.
SYSTEM_ROOTS = ("/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                "/libx32")


@dataclass(frozen=True)
class LanguageSpec:
    name: str
    binaries: tuple[str, ...]
    # The SandboxConfig field that overrides the search.
    config_key: str
    source_file: str
    # Runtimes that reserve large virtual areas (JVM, V8, LLVM) break under RLIMIT_AS.
    address_space_limit: bool
    # Compiled languages: the glob of what compilation leaves for the run to use.
    artifacts: str = ""


SPECS: dict[str, LanguageSpec] = {
    "python": LanguageSpec("python", ("python3",), "python_path", "main.py", True),
    "bash": LanguageSpec("bash", ("bash",), "bash_path", "main.sh", True),
    "javascript": LanguageSpec("javascript", ("node", "nodejs"), "node_path", "main.js", False),
    "rust": LanguageSpec("rust", ("rustc",), "rustc_path", "main.rs", False, "main"),
    "java": LanguageSpec("java", ("java",), "java_path", "Main.java", False, "*.class"),
}
assert set(SPECS) == set(LANGUAGES)

# The compiled binary arrives in the run's fresh work dir as a plain file.
_RUST_RUN_SCRIPT = "chmod u+x main && exec ./main"
# The JVM flags of both javac and the program: the serial collector keeps threads and
# memory low; no perf data file in the work dir.
_JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:-UsePerfData")


@dataclass(frozen=True)
class Toolchain:
    """A resolved toolchain: where it is on the host and how a job calls it."""

    language: str
    executable: str
    # The directory tree the executable needs (its prefix, or rustc's sysroot).
    home: str
    # Where home is bound inside the sandbox; empty when it is used at its own path.
    mount: str = ""
    version: str = ""
    # rust: the shell that starts the compiled binary.
    shell: str = ""
    # Compiled languages: the compiler (rustc, javac) on the host.
    compiler: str = ""
    # java: the memory the JVM sizes its heap from (MiB), the job's limit: on cgroup v1 it
    # does not find its memory limit (jobs lack the cpuset and cpuacct hierarchies it
    # wants), and without a cgroup there is none to find. 0: let the JVM look.
    jvm_max_ram_mb: int = 0

    @property
    def spec(self) -> LanguageSpec:
        return SPECS[self.language]

    @property
    def inner_executable(self) -> str:
        """The executable's path as the job sees it."""
        if not self.mount:
            return self.executable
        return self._inner(self.executable)

    def _inner(self, path: str) -> str:
        if not self.mount:
            return path
        return os.path.join(self.mount, os.path.relpath(path, self.home))

    @property
    def inner_compiler(self) -> str:
        """The compiler's path as the job sees it."""
        return self._inner(self.compiler)

    @property
    def compiled(self) -> bool:
        return bool(self.compiler)

    def probe_argv(self) -> list[str]:
        return [self.inner_executable, "--version"]

    def compile_argv(self, program: Program) -> list[str]:
        """The command that compiles the program in its work dir, warnings off."""
        compiler = self.inner_compiler
        if self.language == "rust":
            return [compiler, "--edition", "2021", "-C", "opt-level=1", "-C", "strip=symbols",
                    "-A", "warnings", "-o", "main", program.source_file]
        return [compiler, *(f"-J{flag}" for flag in self._jvm_flags()), "-Xlint:none", "-nowarn",
                "-encoding", "UTF-8", "-d", ".", program.source_file]

    def _jvm_flags(self) -> tuple[str, ...]:
        # So a program over the limit gets OutOfMemoryError, not the kernel's SIGKILL.
        if self.jvm_max_ram_mb:
            return (*_JVM_FLAGS, f"-XX:MaxRAM={self.jvm_max_ram_mb}m")
        return _JVM_FLAGS

    def run_argv(self, program: Program | None = None) -> list[str]:
        """The command that runs the job (compiled: its artifacts) in its work dir."""
        exe = self.inner_executable
        if self.language == "rust":
            return [self.shell, "-c", _RUST_RUN_SCRIPT]
        if self.language == "java":
            main_class = program.main_class if program else JAVA_MAIN_CLASS
            return [exe, *self._jvm_flags(), "-cp", ".", main_class]
        if self.language == "python":
            # Unbuffered, so output written before a timeout is not lost.
            return [exe, "-u", self.spec.source_file]
        return [exe, self.spec.source_file]


def program_for(language: str, code: str) -> Program:
    """The source to compile for a compiled language's job, snippets completed."""
    if language == "rust":
        return rust_program(code)
    if language == "java":
        return java_program(code)
    return Program(SPECS[language].source_file, code)


def reachable_by(path: str | Path, uid: int, gid: int) -> bool:
    """Whether uid/gid (no supplementary groups) can reach path: run a file, enter a dir."""
    target = Path(path)
    for part in [*reversed(target.parents), target]:
        try:
            info = part.stat()
        except OSError:
            return False
        need = 0o5 if part == target and stat.S_ISREG(info.st_mode) else 0o1
        if info.st_uid == uid:
            bits = (info.st_mode >> 6) & 0o7
        elif info.st_gid == gid:
            bits = (info.st_mode >> 3) & 0o7
        else:
            bits = info.st_mode & 0o7
        if bits & need != need:
            return False
    return True


def _home_dirs(language: str) -> list[str]:
    """Per-user install places tried after the system path (rustup, a JDK in JAVA_HOME)."""
    if language == "rust":
        cargo = os.environ.get("CARGO_HOME") or os.path.expanduser("~/.cargo")
        return [os.path.join(cargo, "bin")]
    if language == "java" and os.environ.get("JAVA_HOME"):
        return [os.path.join(os.environ["JAVA_HOME"], "bin")]
    return []


def find_executable(spec: LanguageSpec, config: SandboxConfig, search_path: str) -> str | None:
    """The configured path (which must exist), else the first binary on the search path."""
    override: str = getattr(config, spec.config_key)
    if override:
        if not os.path.isabs(override) or not os.access(override, os.X_OK):
            raise ConfigError(f"{override!r} is not an absolute path to an executable",
                              key=f"sandbox.{spec.config_key}")
        return override
    path = os.pathsep.join([search_path, *_home_dirs(spec.name)])
    for name in spec.binaries:
        found = shutil.which(name, path=path)
        if found:
            return os.path.abspath(found)
    return None


def _real_path(path: str) -> str:
    return os.path.realpath(path)


def _prefix(executable: str) -> str:
    parent = os.path.dirname(executable)
    return os.path.dirname(parent) if os.path.basename(parent) == "bin" else parent


async def _rust_sysroot(rustc: str) -> str:
    """The real toolchain behind rustc, which may be a rustup proxy."""
    # The proxy needs the agent's own environment (HOME, RUSTUP_HOME) to find its toolchain.
    process = await asyncio.create_subprocess_exec(
        rustc, "--print", "sysroot", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise LookupError(f"{rustc} --print sysroot did not answer within 60 s") from None
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LookupError(f"{rustc} --print sysroot failed: {tail[0]}")
    return out.decode().strip()


def _rust_toolchain(sysroot: str, search_path: str) -> Toolchain:
    rustc = os.path.join(sysroot, "bin", "rustc")
    if not os.access(rustc, os.X_OK):
        raise LookupError(f"no rustc in the sysroot {sysroot}")
    shell = shutil.which("sh", path=search_path)
    if shutil.which("cc", path=search_path) is None or shell is None:
        raise LookupError(f"rustc needs sh and a C linker (cc) on {search_path}: install gcc")
    return Toolchain("rust", rustc, sysroot, shell=shell, compiler=rustc)


def _java_toolchain(java: str, config: SandboxConfig) -> Toolchain:
    javac = os.path.join(os.path.dirname(java), "javac")
    if not os.access(javac, os.X_OK):
        raise LookupError(f"no javac beside {java}: install a JDK, not only a runtime "
                          "(apt-get install default-jdk-headless)")
    max_ram_mb = config.memory_limit_mb if config.mode != "none" else 0
    return Toolchain("java", java, _prefix(java), compiler=javac, jvm_max_ram_mb=max_ram_mb)


def _visible(path: str) -> bool:
    """Whether a path lies under the system roots bubblewrap shows a job."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + "/") for root in SYSTEM_ROOTS)


def _place(toolchain: Toolchain, relocate: bool, job_user: tuple[int, int] | None) -> Toolchain:
    """Bind the toolchain under TOOLCHAIN_MOUNT if the job user cannot reach it."""
    if relocate and not _visible(toolchain.executable):
        return replace(toolchain, mount=f"{TOOLCHAIN_MOUNT}/{toolchain.language}")
    if job_user is None or reachable_by(toolchain.executable, *job_user):
        return toolchain
    if not relocate:
        raise LookupError(
            f"{toolchain.executable} is not readable by uid {job_user[0]} (a directory on "
            'its path is private); install the toolchain system-wide or use mode = "bwrap", '
            "which binds it read-only")
    return replace(toolchain, mount=f"{TOOLCHAIN_MOUNT}/{toolchain.language}")


async def resolve(language: str, config: SandboxConfig, *, search_path: str,
                  relocate: bool, job_user: tuple[int, int] | None) -> Toolchain:
    """Find a toolchain; raises LookupError with the reason it cannot be used.

    relocate: unreachable toolchains may be bound under TOOLCHAIN_MOUNT (bwrap mode).
    job_user: the (uid, gid) jobs run as, or None when they keep the agent's identity.
    """
    spec = SPECS[language]
    executable = find_executable(spec, config, search_path)
    if executable is None:
        names = " or ".join(spec.binaries)
        raise LookupError(f"no {names} on {search_path} (set sandbox.{spec.config_key})")
    if language == "rust":
        # Not the real path: a rustup proxy picks its tool by the name it was called by.
        toolchain = _rust_toolchain(await _rust_sysroot(executable), search_path)
    else:
        real = _real_path(executable)
        toolchain = (_java_toolchain(real, config) if language == "java"
                     else Toolchain(language, real, _prefix(real)))
    return _place(toolchain, relocate, job_user)
