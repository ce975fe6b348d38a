"""A supervising parent for the non-coordinator processes of an explicit multi-process job.

When process 0, the coordinator, dies, jaxlib's coordination agent in every other process aborts that process from
a C++ thread (SIGABRT, status 134, a C++ stack dump); nothing in Python can catch it. So a process i != 0 runs its
program again as a child (the real process of the job) and watches it: stdout passes through, stderr is relayed
line by line but for jaxlib's abort dump, SIGINT and SIGTERM are forwarded, and when the child is aborted that way
the parent prints one line naming the lost coordinator and exits with status 1; else it exits as the child did.
Not with ``--debug`` or UNGUIDE_DEBUG=1 (the full dump is wanted then), nor for process 0 or single-process runs.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

SUPERVISED = "UNGUIDE_SUPERVISED"
_PARENT_PID = "UNGUIDE_SUPERVISOR_PID"
# The supervised child's last completed step ("train step 120/200"), so that the one line can name it.
_PROGRESS_FILE = "UNGUIDE_PROGRESS_FILE"
# jaxlib's fatal log line (glog "F<mmdd> <time> <thread> client.h:80] Terminating process ...") and the dump after it.
_FATAL = re.compile(rb"^F\d{4} .*(client\.h:\d+\]|Terminating process because)")
_DUMP_START = (b"*** Check failure stack trace", b"*** ")
# Log lines of jaxlib's coordination agent that come with the abort (before and after the fatal line).
_AGENT_LOG = re.compile(rb"^[EWI]\d{4} \S+ +\d+ (coordination_service_agent|preemption_sync_manager)\.cc")
_CONTINUED = (b"Additional GRPC error", b":UNKNOWN:")
_DUMP_LINE = re.compile(rb"^([EFWI]\d{4} |\*\*\* |    @ |Additional GRPC error|:UNKNOWN:|Fatal Python error|"
                        rb"Current thread|Thread 0x|  File |\s*$|Extension modules:)")
_ABORTED = (-signal.SIGABRT, 128 + signal.SIGABRT)


def _debug_requested() -> bool:
    return "--debug" in sys.argv or os.environ.get("UNGUIDE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def supervise_if_needed() -> None:
    """In a process i != 0 of an explicit job (JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID): run this program again as
    a supervised child and exit as described in the module doc (never returns). In that child: make sure it dies
    with its parent. Anywhere else: nothing."""
    if os.environ.get(SUPERVISED):
        _die_with_parent()
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    process_id = os.environ.get("JAX_PROCESS_ID", "").strip()
    if not address or process_id in ("", "0") or _debug_requested() or sys.argv[0] in ("", "-"):
        return
    command = [sys.executable, *(getattr(sys, "orig_argv", [])[1:] or sys.argv)]
    code = _run_child(command, address, process_id)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)  # this process did nothing of the job: nothing to clean up


def supervisor_pid() -> int | None:
    """In a supervised child: its parent's pid, the process the user started (and sees); else None."""
    pid = os.environ.get(_PARENT_PID) if os.environ.get(SUPERVISED) else None
    return int(pid) if pid and pid.isdigit() else None


def _die_with_parent() -> None:
    """The supervised child ends (SIGKILL) when its parent does, however the parent ends (Linux only)."""
    parent = os.environ.get(_PARENT_PID)
    if not sys.platform.startswith("linux") or not parent:
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- best effort
        return
    if os.getppid() != int(parent):  # the parent ended before the prctl
        os._exit(1)


_last_completed = ""  # this process's last report_progress, for the lost-process line (parallel.hosts)


def last_progress() -> str:
    """What this process last completed (``report_progress``), or ""."""
    return _last_completed


def report_progress(what: str) -> None:
    """Records ``what`` (the last completed step) for the line that names a lost process: in memory for this
    process's own line and, under a supervisor, in the file its parent reads if the job dies with the
    coordinator."""
    global _last_completed
    _last_completed = what
    path = os.environ.get(_PROGRESS_FILE)
    if not path:
        return
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(what)
        os.replace(tmp, path)
    except OSError:  # progress is a courtesy of the error line, never a reason to stop
        pass


def _last_progress(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _run_child(command: list[str], address: str, process_id: str) -> int:
    import tempfile

    progress = os.path.join(tempfile.gettempdir(), f"unguide-progress-{os.getpid()}")
    env = dict(os.environ, **{SUPERVISED: "1", _PARENT_PID: str(os.getpid()), _PROGRESS_FILE: progress})
    try:
        return _supervise(command, env, address, process_id, progress)
    finally:
        for leftover in (progress, f"{progress}.tmp"):
            try:
                os.unlink(leftover)
            except OSError:
                pass


def _supervise(command: list[str], env: dict, address: str, process_id: str, progress: str) -> int:
    # A process group of its own: a Ctrl-C in the terminal reaches the parent only, which forwards it once.
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, process_group=0)

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    relay = _Relay(out)
    fd = child.stderr.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        relay.feed(chunk)
    code = child.wait()
    relay.end()
    if relay.fatal and code in _ABORTED:
        if relay.said_error:  # the child named the lost process itself, just before the abort
            return 1
        last = _last_progress(progress)
        where = (f"after {last}" if last else "before its first completed step")
        relay.write(f"error: lost process 0 (the coordinator at {address}): the job stopped {where}; process "
                    f"{process_id} cannot go on without it\n".encode())
        relay.flush()
        return 1
    relay.release()
    relay.flush()
    if code < 0:  # ended by a signal: end the same way, so that whoever started this process sees the same status
        sys.stdout.flush()
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


class _Relay:
    """The child's stderr, passed on line by line; from jaxlib's fatal line on, held back (``fatal``)."""

    def __init__(self, out) -> None:
        self.out = out
        self.partial = b""           # the start of a line not written yet
        self.mid_line = False        # part of the current line was written already
        self.pending: list[bytes] = []  # coordination-agent log lines that may come before a fatal line
        self.held: list[bytes] = []     # everything after the fatal line
        self.fatal = False
        self.said_error = False         # an "error:" line was passed on

    def write(self, data: bytes) -> None:
        if self.out is not None:
            self.out.write(data)
        else:
            sys.stderr.write(data.decode(errors="replace"))

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def feed(self, chunk: bytes) -> None:
        data = self.partial + chunk
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            self._line(line + b"\n")
        # Progress bars ("\r...") have no newline: pass a partial line on at once, unless it may start a log line.
        if self.partial and not self.fatal and (self.mid_line or self.partial[:1] not in b"EFWI*"):
            self._release_pending()
            self.write(self.partial)
            self.partial, self.mid_line = b"", True
        self.flush()

    def _line(self, line: bytes) -> None:
        if self.fatal:
            self.held.append(line)
            return
        at_start, self.mid_line = not self.mid_line, False
        if at_start and (_FATAL.match(line) or line.startswith(_DUMP_START)):
            self.fatal = True
            self.pending.clear()  # part of the abort
            self.held.append(line)
        elif at_start and (_AGENT_LOG.match(line) or (self.pending and line.startswith(_CONTINUED))):
            self.pending.append(line)
        else:
            self._release_pending()
            self.said_error = self.said_error or (at_start and line.startswith(b"error:"))
            self.write(line)

    def _release_pending(self) -> None:
        for line in self.pending:
            self.write(line)
        self.pending.clear()

    def end(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = b""

    def release(self) -> None:
        """The child was not aborted after all: what it said but the dump."""
        self._release_pending()
        for line in self.held:
            if not _DUMP_LINE.match(line):
                self.write(line)
        self.held.clear()
