"""Run untrusted Python programs (generated code plus its tests) and report whether they pass.

`phikit eval` scores code HumanEval-style: the model's completion and the task's tests are run as one Python
program, which passes if it exits with status 0 within the limits. The program is untrusted: it may loop forever,
allocate without bound, fork, delete files or open sockets. Whatever it does, it is scored as failed (or timed
out) and it should harm nothing outside its sandbox.

How a program runs
------------------
`run_program` writes the source into a fresh temporary directory (the program's cwd, HOME and TMPDIR) and starts
`python -I -B` there with a minimal environment, stdin from /dev/null, stdout discarded, stderr to an unnamed file
in that directory, in a new session (its own process group). The child first runs this module's `_child_main`
(the module is loaded by file path, so the child imports nothing of phikit or torch), which:

1. sets rlimits: address space (`memory_mb`), CPU seconds (timeout + 1, a backstop behind the wall clock), file
   size (64 MB; this also bounds the captured stderr), processes (`_NPROC`), open files, no core dumps, no POSIX
   message queues; and sets no_new_privs, so setuid binaries give it nothing;
2. when the parent is root: moves into new network and IPC namespaces (no network at all, not even loopback),
   then switches to an unprivileged uid/gid of its own. Each run leases a uid from a reserved range (`_UID_BASE`
   and up, held by a lock file, so concurrent runs, also from other processes, never share one and cannot signal
   each other or share a process limit); if that range is not mapped in this user namespace, all runs use
   nobody/nogroup, and then concurrent runs do share a process limit and can signal each other. The
   interpreter's module directories are opened before the switch and reached through /proc/self/fd afterwards,
   so the standard library stays importable even when it lives under a directory the new uid cannot enter (a
   pyenv under /root, mode 0700);
3. installs the guard (`_install_guard`, unless `guard=False`), then reports "ready" on a pipe: a child that
   exits without reporting is a broken sandbox (`SandboxError`), not a failed sample;
4. runs the program as `__main__`.

The parent waits for the wall clock (on a pidfd, without reaping, so the process group id cannot be reused
meanwhile), then kills the whole process group with SIGKILL (also after a normal exit, so no forked child
outlives the run) and reaps. As root it then kills every process left with the run's uid (kill(-1) sent as that
uid, which also catches children that left the process group with setsid), removes the temporary directory and
whatever that uid left in the world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock), and only then
releases the uid.

What is a real boundary and what is best effort
-----------------------------------------------
Enforced by the kernel in every case: the rlimits (memory and CPU per process, file size, number of processes
of the user, open files), the wall clock, the process group kill, no_new_privs.

Enforced by the kernel when the parent runs as root (as in CI): the uid switch, so the program cannot delete,
rename, truncate or write any file outside its temporary directory and the world-writable directories, nor
signal or trace other processes; the process limit (RLIMIT_NPROC is not enforced for root, one more reason to
switch); the kill of every process of the uid; the network and IPC namespaces, when the kernel lets this process
unshare them (`network_isolated()` tells).

Best effort only: the guard. It replaces, in the program's own interpreter, the functions that fork, exec, kill,
exit early, change owners or modes, delete, rename or write files outside the working directory, and blocks the
socket, ctypes and multiprocessing modules. That stops what model-written code does by accident or by naivety,
and fails it with a clear PermissionError, but Python code written to escape it can (the originals are reachable,
e.g. through the patches' closures or gc). When the parent is not root, the guard is all that protects the
user's files and the network, and children that leave the process group (setsid, blocked only by the guard) are
not swept.

Not bounded: total memory across the program's processes (up to `_NPROC` x `memory_mb`), disk use in the
temporary directory beyond the 64 MB per file, files written by the uid into subdirectories of world-writable
directories that belong to others, reading any file that every user may read. Zombie processes are reaped by
init, not here.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

__all__ = ["FILE_SIZE_LIMIT", "STDERR_TAIL", "Result", "SandboxError", "network_isolated", "run_program",
           "run_programs"]

STDERR_TAIL = 2000  # characters of stderr kept in a Result
FILE_SIZE_LIMIT = 64 * 2**20  # bytes, any one file the program writes (including its stderr)
_NPROC = 16  # processes (and threads) of the program's user
_NOFILE = 256

_UID_BASE = 2_000_000_000  # in systemd's "unused" range 1879048192-2147483647 (docs/UIDS-GIDS.md)
_UID_COUNT = 4096
_NOBODY = 65534
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

_CLONE_NEWNET = 0x40000000
_CLONE_NEWIPC = 0x08000000
_PR_SET_NO_NEW_PRIVS = 38

# The child's first code: load this file by path and hand over to _child_main.
_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_phikit_sandbox', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module._child_main(sys.argv[2:])\n"
)

# Sent as the run's uid, so it can only reach that uid's processes; repeated because a zombie also counts as
# "signalled" and a fork bomb's children may still be forking.
_KILL_ALL = (
    "import os, sys\n"
    "uid = int(sys.argv[1])\n"
    "os.setgroups([]); os.setgid(uid); os.setuid(uid)\n"
    "for _ in range(20):\n"
    "    try:\n"
    "        os.kill(-1, 9)\n"
    "    except ProcessLookupError:\n"
    "        break\n"
)


class SandboxError(RuntimeError):
    """The sandbox itself could not run a program (as opposed to the program failing)."""


@dataclass(frozen=True)
class Result:
    """How one program ran. status is 'passed' (exit 0), 'failed' (nonzero exit or a signal) or 'timeout'."""

    status: str
    returncode: int  # negative: killed by that signal
    seconds: float  # wall clock, including the interpreter's start
    stderr: str  # the last STDERR_TAIL characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Identity:
    uid: int
    gid: int
    private: bool  # leased for this run alone: safe to kill its processes and delete its files


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, *, guard: bool = True) -> Result:
    """Run `source` as a Python program in the sandbox; it passes if it exits 0 within `timeout` seconds.

    With the guard (the default) a program that raises SystemExit (sys.exit, exit(), even with status 0) is
    scored as failed, as human-eval does: otherwise a completion could skip the tests after it by exiting.
    `guard=False` runs the program unpatched, leaving only the kernel-enforced limits (see the module docstring).
    Raises SandboxError when the sandbox cannot start a program at all (e.g. `memory_mb` too small for Python).
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
    with _identity() as identity:
        try:
            with tempfile.TemporaryDirectory(prefix="phikit-sandbox-", ignore_cleanup_errors=True) as workdir:
                return _run_in(workdir, source, timeout, memory_mb, identity, guard)
        finally:
            if identity is not None and identity.private:
                _sweep(identity.uid)


def run_programs(sources: Iterable[str], timeout: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None, *, guard: bool = True) -> list[Result]:
    """run_program on each source, `workers` at a time (default os.cpu_count()); results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda s: run_program(s, timeout, memory_mb, guard=guard), sources))


_network_isolated: bool | None = None


def network_isolated() -> bool:
    """Whether sandboxed programs get a network namespace of their own (root, and the kernel allows unshare)."""
    global _network_isolated
    if _network_isolated is None:
        if os.geteuid() != 0:
            _network_isolated = False
        else:
            ours = os.readlink("/proc/self/ns/net")
            probe = f"import os, sys\nsys.exit(0 if os.readlink('/proc/self/ns/net') != {ours!r} else 1)\n"
            _network_isolated = run_program(probe, timeout=30.0, memory_mb=512, guard=False).passed
    return _network_isolated


# ---------------------------------------------------------------------------------------------- parent side


def _run_in(workdir: str, source: str, timeout: float, memory_mb: int, identity: _Identity | None,
            guard: bool) -> Result:
    program = os.path.join(workdir, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    os.chmod(program, 0o644)
    if identity is not None:
        os.chown(workdir, identity.uid, identity.gid)
    uid, gid = (identity.uid, identity.gid) if identity is not None else (-1, -1)
    ready_r, ready_w = os.pipe()
    try:
        with tempfile.TemporaryFile(dir=workdir) as err:
            args = [workdir, str(ready_w), repr(timeout), str(memory_mb), str(uid), str(gid), str(int(guard))]
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, os.path.abspath(__file__), *args],
                cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, pass_fds=(ready_w,), start_new_session=True)
            os.close(ready_w)
            ready_w = -1
            try:
                exited = _wait_for_exit(proc.pid, timeout)
            finally:
                _kill_group(proc.pid)
                proc.wait()
            seconds = time.monotonic() - start
            if identity is not None and identity.private:
                _sweep_processes(identity.uid)
            tail = _tail(err)
        ready = _was_ready(ready_r)
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    if not exited:
        return Result("timeout", proc.returncode, seconds, tail)
    if not ready:
        raise SandboxError(f"the sandbox failed before running the program (exit status {proc.returncode}):\n"
                           f"{tail}")
    return Result("passed" if proc.returncode == 0 else "failed", proc.returncode, seconds, tail)


def _environment(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether the process exits within `timeout` s. It is left unreaped (a zombie still leads its process
    group), so the group id cannot be taken by an unrelated process before _kill_group."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return _poll_for_exit(pid, timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)


def _poll_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * STDERR_TAIL))
    return f.read().decode("utf-8", errors="replace")[-STDERR_TAIL:]


def _was_ready(fd: int) -> bool:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) == b"1"
    except BlockingIOError:
        return False


# ------------------------------------------------------------------------------------------ the run's user


@contextmanager
def _identity() -> Iterator[_Identity | None]:
    """The user a program runs as: None (unchanged) unless we are root."""
    if os.geteuid() != 0:
        yield None
        return
    if not (_mapped("/proc/self/uid_map") and _mapped("/proc/self/gid_map")):
        yield _Identity(_NOBODY, _NOBODY, private=False)
        return
    uid, lock_fd = _lease_uid()
    try:
        _sweep(uid)  # whatever a run that crashed before cleaning up left behind
        yield _Identity(uid, uid, private=True)
    finally:
        os.close(lock_fd)


def _mapped(path: str) -> bool:
    """Whether the whole reserved id range is mapped in this user namespace."""
    try:
        with open(path) as f:
            ranges = [tuple(map(int, line.split())) for line in f if line.strip()]
    except (OSError, ValueError):
        return False
    return any(inside <= _UID_BASE and _UID_BASE + _UID_COUNT <= inside + count for inside, _, count in ranges)


def _lease_uid() -> tuple[int, int]:
    """A uid of the reserved range that no other run holds, with the locked file descriptor that holds it."""
    import fcntl
    import random

    locks = _lock_dir()
    first = random.randrange(_UID_COUNT)
    for i in range(_UID_COUNT):
        uid = _UID_BASE + (first + i) % _UID_COUNT
        fd = os.open(os.path.join(locks, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if not _assigned(uid):
            return uid, fd
        os.close(fd)
    raise SandboxError(f"all {_UID_COUNT} sandbox uids are in use")


def _assigned(uid: int) -> bool:
    """Whether the id belongs to a real user or group, which must never be used (or swept)."""
    import grp
    import pwd

    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _lock_dir() -> str:
    parent = "/run" if os.path.isdir("/run") else tempfile.gettempdir()
    path = os.path.join(parent, "phikit-sandbox")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    # A sandboxed program could have planted this directory (if it lives in /tmp): only trust our own.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise SandboxError(f"{path} is not a root-owned private directory")
    return path


def _sweep(uid: int) -> None:
    _sweep_processes(uid)
    _remove_files_of(uid)


def _sweep_processes(uid: int) -> None:
    for _ in range(3):
        if not _live_processes_of(uid):
            return
        subprocess.run([sys.executable, "-I", "-S", "-B", "-c", _KILL_ALL, str(uid)], env={},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    if _live_processes_of(uid):
        raise SandboxError(f"could not kill the processes of sandbox uid {uid}")


def _live_processes_of(uid: int) -> list[int]:
    """Processes whose real uid is `uid`, zombies excepted (they are dead; init reaps them)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(name))
    return found


def _remove_files_of(uid: int) -> None:
    import shutil

    for directory in {*_WORLD_WRITABLE, tempfile.gettempdir()}:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------- child side


def _child_main(argv: list[str]) -> None:
    """The sandboxed process: limits, namespaces, user, guard, then the program. Runs in a fresh interpreter."""
    workdir, ready_fd, timeout, memory_mb, uid, gid, guard = argv
    path = os.path.join(workdir, "program.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    libc = _libc()
    if os.geteuid() == 0:
        # Each may be refused (no CAP_SYS_ADMIN in this container): then the network is only guarded.
        libc.unshare(_CLONE_NEWNET)
        libc.unshare(_CLONE_NEWIPC)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _set_limits(float(timeout), int(memory_mb))
    if int(uid) >= 0:
        _switch_user(int(uid), int(gid))
    if guard == "1":
        _install_guard(os.path.realpath(workdir))
    os.write(int(ready_fd), b"1")
    os.close(int(ready_fd))
    _run_main(source, path, guard == "1")


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _set_limits(timeout: float, memory_mb: int) -> None:
    cpu = math.ceil(timeout) + 1
    for limit, soft, hard in ((resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20),
                              (resource.RLIMIT_CPU, cpu, cpu + 1),
                              (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
                              (resource.RLIMIT_NPROC, _NPROC, _NPROC),
                              (resource.RLIMIT_NOFILE, _NOFILE, _NOFILE),
                              (resource.RLIMIT_CORE, 0, 0),
                              (resource.RLIMIT_MSGQUEUE, 0, 0)):
        _, current = resource.getrlimit(limit)
        if current != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(limit, (soft, hard))


def _switch_user(uid: int, gid: int) -> None:
    _reopen_import_path()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise SandboxError(f"could not switch to uid {uid}")


def _reopen_import_path() -> None:
    """Open every import directory while still root and import through /proc/self/fd/N, which leads straight into
    it whatever the permissions of the directories above (a pyenv under /root is 0700)."""
    opened = {p: f"/proc/self/fd/{os.open(p, os.O_RDONLY)}" for p in sys.path if os.path.exists(p)}
    longest_first = sorted(opened, key=len, reverse=True)

    def reopened(entry: str) -> str:
        for directory in longest_first:
            if entry == directory or entry.startswith(directory + os.sep):
                return opened[directory] + entry[len(directory):]
        return entry

    sys.path[:] = [reopened(p) for p in sys.path]
    # Packages already imported (encodings, importlib, ...) look for their submodules in their own __path__.
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            search[:] = [reopened(p) if isinstance(p, str) else p for p in search]
    sys.path_importer_cache.clear()


def _run_main(source: str, path: str, guard: bool) -> None:
    import builtins
    import types

    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.modules.pop("_phikit_sandbox", None)
    sys.argv = [path]
    code = compile(source, path, "exec")
    try:
        exec(code, main.__dict__)
    except SystemExit as exit_:
        if not guard:
            raise
        print(f"sandbox: the program exited early (SystemExit({exit_.code!r})), scored as failed", file=sys.stderr)
        raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------------- guard

_DENIED_OS = (
    # processes
    "fork", "forkpty", "kill", "killpg", "system", "popen", "pidfd_open", "_exit", "posix_spawn", "posix_spawnp",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "setsid", "setpgid", "setpgrp", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid",
    "setresuid", "setresgid", "setgroups", "chroot",
    # owners and modes
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags",
)
# Functions that change the file system: allowed only on paths inside the working directory.
# name -> the (position, keyword) of each path argument to check.
_CONFINED_OS = {
    "remove": ((0, "path"),), "unlink": ((0, "path"),), "rmdir": ((0, "path"),), "mkdir": ((0, "path"),),
    "mkfifo": ((0, "path"),), "mknod": ((0, "path"),), "truncate": ((0, "path"),), "utime": ((0, "path"),),
    "rename": ((0, "src"), (1, "dst")), "replace": ((0, "src"), (1, "dst")), "link": ((0, "src"), (1, "dst")),
    "symlink": ((1, "dst"),),
}
_BLOCKED_MODULES = ("socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "multiprocessing",
                    "_multiprocessing", "_posixshmem", "resource", "pty")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_guard(root: str) -> None:
    """Best-effort patches in the program's interpreter (see the module docstring: not a security boundary)."""
    import builtins
    import io
    import posix
    import shutil

    realpath, commonpath, fsdecode = os.path.realpath, os.path.commonpath, os.fsdecode

    def check_inside(path, what: str) -> None:
        if isinstance(path, int):  # an already open descriptor
            return
        real = fsdecode(realpath(path))
        if commonpath([real, root]) != root:
            raise PermissionError(errno.EACCES, f"sandbox: {what} outside the working directory", fsdecode(path))

    def denied(name: str):
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EPERM, f"sandbox: {name} is not allowed")
        return refuse

    def confined(name: str, fn, arguments):
        def wrapper(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(errno.EPERM, f"sandbox: os.{name} with dir_fd is not allowed")
            for position, keyword in arguments:
                if position < len(args):
                    check_inside(args[position], f"os.{name}")
                elif keyword in kwargs:
                    check_inside(kwargs[keyword], f"os.{name}")
            return fn(*args, **kwargs)
        return wrapper

    real_os_open, real_open = os.open, io.open

    def os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            if kwargs.get("dir_fd") is not None:
                raise PermissionError(errno.EPERM, "sandbox: os.open for writing with dir_fd is not allowed")
            check_inside(path, "writing")
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            check_inside(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    replacements = {name: denied(f"os.{name}") for name in _DENIED_OS}
    replacements.update({name: confined(name, getattr(os, name), arguments)
                         for name, arguments in _CONFINED_OS.items() if hasattr(os, name)})
    replacements["open"] = os_open
    for module in (os, posix):  # patching os alone would leave posix.unlink & co.
        for name, replacement in replacements.items():
            if hasattr(module, name):
                setattr(module, name, replacement)
    builtins.open = io.open = open_
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, denied(f"shutil.{name}"))
    subprocess.Popen = denied("subprocess.Popen")  # type: ignore[misc]
    import _posixsubprocess
    _posixsubprocess.fork_exec = denied("_posixsubprocess.fork_exec")
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, denied(f"signal.{name}"))
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]  # "import socket" now raises ImportError
