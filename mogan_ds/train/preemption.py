"""Stopping a run cleanly when the cluster says so: a signal, or the launcher going away.

Slurm's preemption, ``scancel``, a maintenance drain and the time limit's warning
(``sbatch --signal``) all deliver a signal some time before the kill. `StopRequest` turns
each of ``output.exit_signals`` into a flag on the rank that got it (the handler does
nothing else, so a second signal in the middle of a save changes nothing); at the next
iteration boundary `MoGANTrainer.fit` asks `agreed` (one all-reduce of the flag, MAX), so
every rank stops at the same step, the checkpoint is saved by all of them, and the job
exits with ``cli.errors.EXIT_REQUEUE`` (75).

DeepSpeed's single-node launcher (the ``deepspeed`` command, and its per-node
``deepspeed.launcher.launch``) does not pass a SIGTERM on to the ranks: killed, it leaves
them training into the run folder. So each rank also watches its launcher
(`LauncherWatch`): the kernel sends it SIGTERM when its parent (the per-node launcher) dies
(``PR_SET_PDEATHSIG``), and a thread notices when the ``deepspeed`` command above that one
is gone; either stops the run at the next boundary like a signal does. No rank outlives the
launcher that owns the run folder by more than an iteration and a save.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_LAUNCHER_GONE = 1  # flag codes: 0 nothing, 1 the launcher is gone, 1000 + signum a signal
_SIGNAL_BASE = 1000
_DS_NODE_LAUNCHER = "deepspeed.launcher.launch"
_SHIELDED: tuple[signal.Signals, ...] = ()  # the installed exit signals, not those of forked children
_AT_FORK = False


def _ppid_of(pid: int) -> int | None:
    """The parent pid of `pid`, None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[1])  # after "pid (comm)": state, ppid
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process(pid).ppid()
    except Exception:
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            import psutil

            return " ".join(psutil.Process(pid).cmdline())
        except Exception:
            return ""


def _set_parent_death_signal(sig: int) -> bool:
    """Linux: ask the kernel for `sig` when the parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return False


class LauncherWatch:
    """Notices that the DeepSpeed launcher of this rank is gone.

    Active only under DeepSpeed's launcher (the parent runs ``deepspeed.launcher.launch``):
    the parent is watched by the kernel (SIGTERM on its death) and, like the ``deepspeed``
    command above it, by a daemon thread that polls the pids every `interval` seconds.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.gone: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.parent = os.getppid()
        self.grandparent = None
        self.active = _DS_NODE_LAUNCHER in _cmdline(self.parent)
        if self.active:
            gp = _ppid_of(self.parent)
            self.grandparent = gp if gp and gp > 1 else None

    def start(self) -> LauncherWatch:
        if not self.active or self._thread is not None:
            return self
        if _set_parent_death_signal(signal.SIGTERM) and os.getppid() != self.parent:
            self.gone = f"the DeepSpeed launcher (pid {self.parent}) exited"  # died before prctl
        self._thread = threading.Thread(target=self._run, name="mogan-launcher-watch", daemon=True)
        self._thread.start()
        return self

    def check(self) -> str | None:
        if self.gone is None and self.active:
            if os.getppid() != self.parent:
                self.gone = f"the DeepSpeed launcher (pid {self.parent}) exited"
            elif self.grandparent is not None and _ppid_of(self.parent) != self.grandparent:
                self.gone = f"the deepspeed command (pid {self.grandparent}) that started this job exited"
        return self.gone

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.check():
                return

    def close(self) -> None:
        self._stop.set()


class StopRequest:
    """This rank's wish to stop, and the agreement of all ranks on it.

    `install` sets the handlers (from the main thread; launch/train.py does it before the
    set-up, so a signal during model loading is kept too) and starts the `LauncherWatch`;
    `active()` does the same for the length of a `with` block when nothing installed them
    yet (in-process use, tests). Processes forked afterwards (data-loader workers) do not die
    of these signals unless their rank sends them (`_after_fork_in_child`).
    """

    def __init__(self, signals=("SIGTERM", "SIGUSR1"), watch_launcher: bool = True):
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.received: signal.Signals | None = None
        self.count = 0
        self.watch_launcher = watch_launcher
        self.watch: LauncherWatch | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._reported = False

    # ------------------------------------------------------------------ handlers
    def _handler(self, signum, frame) -> None:
        # Only a flag: safe at any point, and a second signal during a save changes nothing.
        if self.received is None:
            self.received = signal.Signals(signum)
        self.count += 1

    @property
    def installed(self) -> bool:
        return bool(self._previous) or self.watch is not None

    def install(self) -> StopRequest:
        if self.installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("output.exit_signals: not on the main thread, no handlers installed")
            return self
        global _SHIELDED, _AT_FORK
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        _SHIELDED = tuple(self._previous)
        if not _AT_FORK and hasattr(signal, "sigwaitinfo"):
            os.register_at_fork(
                before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
            )
            _AT_FORK = True
        if self.watch_launcher:
            self.watch = LauncherWatch().start()
        return self

    def uninstall(self) -> None:
        global _SHIELDED
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        _SHIELDED = ()
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def ignore(self) -> None:
        """From now on the exit signals are ignored: the run has saved what it will save and is
        on its way out. (Python puts its own handlers back to the default action while the
        interpreter finalizes; a late signal would then turn exit code 75 into a death by signal.)"""
        for sig in self.signals:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                return

    @contextlib.contextmanager
    def active(self):
        """Handlers installed for the block, unless they already were (then left as they are)."""
        mine = not self.installed
        if mine:
            self.install()
        try:
            yield self
        finally:
            if mine:
                self.uninstall()

    # ------------------------------------------------------------------ decision
    def local_code(self) -> int:
        if self.received is not None:
            return _SIGNAL_BASE + int(self.received)
        if self.watch is not None and self.watch.check():
            return _LAUNCHER_GONE
        return 0

    def local_reason(self) -> str | None:
        return describe(self.local_code(), self)

    def agreed(self, device: torch.device | str = "cpu") -> str | None:
        """Collective (one all-reduce, MAX): why the ranks stop now, or None. The same on every rank."""
        code = self.local_code()
        if code and not self._reported:
            self._reported = True  # this rank's own record of what it saw
            log.info("stop requested on this rank: %s", describe(code, self))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([code], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return describe(code, self) if code else None


def describe(code: int, stop: StopRequest | None = None) -> str | None:
    if code >= _SIGNAL_BASE:
        return signal.Signals(code - _SIGNAL_BASE).name
    if code == _LAUNCHER_GONE:
        mine = stop.watch.gone if stop is not None and stop.watch is not None else None
        return mine or "the DeepSpeed launcher exited"
    return None


def _before_fork() -> None:
    # SIGTERM blocked across the fork: the child and every thread it starts inherit the block,
    # so no thread of it dies of a SIGTERM before `_after_fork_in_child` decides.
    if signal.SIGTERM in _SHIELDED:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _after_fork_in_parent() -> None:
    if signal.SIGTERM in _SHIELDED:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _after_fork_in_child() -> None:
    """In a process forked from a rank (a data-loader worker): the rank's exit signals are not its own.

    Slurm signals every process of the job step; a loader worker that died of it would end its
    rank with a DataLoader error instead of a checkpoint. So the other exit signals are
    ignored, and SIGTERM keeps torch's meaning for workers: from the parent (the loader's or
    multiprocessing's shutdown) it ends the process, from anyone else it is ignored. A thread
    waits for it (`signal.sigwaitinfo` tells the sender).
    """
    for sig in _SHIELDED:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    if signal.SIGTERM in _SHIELDED:
        parent = os.getppid()
        threading.Thread(
            target=_end_on_parents_sigterm, args=(parent,), name="sigterm-from-parent", daemon=True
        ).start()


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)
