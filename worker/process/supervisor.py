"""Several ``moderation worker`` processes as one unit: ``moderation worker --processes N``.

One worker process's per-event Python work (validation, fetch, decode planning, decision JSON) runs under one
GIL while one GPU scores about 7,500 crops/s, so a GPU host needs several processes per GPU. The supervisor
is deliberately small: it starts N ordinary ``python -m worker worker --processes 1`` children (same options
and environment, hostname ``{base}-{i}``, metrics port ``base + i``), forwards signals, and fails fast.

* Signals: every SIGTERM/SIGINT it receives is forwarded to every child. The first makes each child drain
  (stop reading the streams, finish and ack what it holds, exit 0); a second makes them exit at once (what
  they held is reclaimed by other workers after the visibility timeout). Children run in their own process
  group, so a terminal's Ctrl-C reaches them once, through the supervisor, and is not counted twice.
* A child that exits on its own (crash, bad checkpoint, OOM kill) stops the unit: the others are drained
  (SIGTERM; SIGKILL if still running after the visibility timeout, past which what they hold is reclaimed
  anyway) and the supervisor exits with the child's status, so the orchestrator restarts the whole unit
  instead of running it quietly at reduced capacity.
* Exit status 0 only when a signal asked for the stop and every child drained cleanly (exited 0).
* On Linux each child gets SIGTERM if the supervisor itself dies (``PR_SET_PDEATHSIG``), so a SIGKILLed
  supervisor leaves no orphan consumers behind: they drain and exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class ChildSpec:
    """One child worker: its name and the options that differ between children."""

    hostname: str
    metrics_port: int | None = None
    device: str | None = None

    def argv(self, common: Sequence[str]) -> list[str]:
        args = [sys.executable, "-m", "worker", "worker", "--processes", "1", *common]
        args += ["--hostname", self.hostname]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        if self.device is not None:
            args += ["--device", self.device]
        return args


def spread_devices(device: str, processes: int, gpus: int) -> list[str | None]:
    """Round-robin ``cuda:0..gpus-1`` for device ``auto``/``cuda`` on a multi-GPU host; else leave it be.

    ``None`` means "the child uses the device from its options and environment unchanged". An explicit
    ``cuda:N`` or ``cpu`` is never overridden.
    """
    if device in ("auto", "cuda") and gpus > 1:
        return [f"cuda:{i % gpus}" for i in range(processes)]
    return [None] * processes


def visible_gpus() -> int:
    """CUDA devices visible to a child (honours ``CUDA_VISIBLE_DEVICES``).

    Counted in a throwaway interpreter: initialising CUDA in the supervisor would cost host memory and start
    driver threads in a process that only forks and waits.
    """
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
        )
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        log.warning("gpu_count_failed", exc_info=True, hint="children keep the configured device")
        return 0


def plan_children(
    processes: int, base_hostname: str, metrics_port: int | None, devices: Sequence[str | None]
) -> list[ChildSpec]:
    return [
        ChildSpec(
            hostname=f"{base_hostname}-{i}",
            metrics_port=None if metrics_port is None else metrics_port + i,
            device=devices[i],
        )
        for i in range(processes)
    ]


def exit_status(returncode: int) -> int:
    """A child's ``Popen.returncode`` as a shell exit status (killed by signal S: 128 + S)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when the supervisor dies; None elsewhere.

    The libc function is looked up here, in the parent, so the forked child only makes one call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    returncode: int | None = None


@dataclass
class Supervisor:
    """Start the children, forward stop signals, fail fast when one exits on its own."""

    children: list[ChildSpec]
    common_args: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    drain_timeout_s: float = 300.0  # after a child failure; the visibility timeout
    poll_s: float = 0.1
    _running: list[_Child] = field(default_factory=list, init=False)
    _pending: list[int] = field(default_factory=list, init=False)
    _stops: int = field(default=0, init=False)  # stop rounds sent to the children (signals, a failure)
    _failed: _Child | None = field(default=None, init=False)
    _kill_at: float | None = field(default=None, init=False)

    def run(self) -> int:
        """Run until every child has exited; returns the supervisor's exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            self._start_all()
            while any(c.returncode is None for c in self._running):
                self._forward_pending()
                self._reap()
                self._escalate()
                time.sleep(self.poll_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        status = self._status()
        how = {c.spec.hostname: describe(c.returncode) for c in self._running if c.returncode is not None}
        if self._failed is not None:
            name = self._failed.spec.hostname
            log.error(
                "supervisor_exited",
                exit_code=status,
                failed_child=name,
                reason=f"worker {name} exited on its own ({how[name]}); the other workers were stopped",
                children=how,
            )
        else:
            (log.info if status == 0 else log.warning)("supervisor_exited", exit_code=status, children=how)
        return status

    # --- start ----------------------------------------------------------------------------------------
    def _start_all(self) -> None:
        preexec = _die_with_parent()
        log.info(
            "supervisor_started",
            processes=len(self.children),
            hostnames=[c.hostname for c in self.children],
            metrics_ports=[c.metrics_port for c in self.children if c.metrics_port is not None] or None,
            devices=[c.device for c in self.children if c.device is not None] or None,
        )
        for spec in self.children:
            if self._pending or self._stops:  # asked to stop while starting: start no more
                break
            try:
                proc = subprocess.Popen(
                    spec.argv(self.common_args),
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    process_group=0,  # terminal signals reach the children only through us
                    preexec_fn=preexec,  # safe: the supervisor runs no threads
                )
            except OSError:
                log.error("child_start_failed", hostname=spec.hostname, exc_info=True)
                self._stop_all(signal.SIGTERM)
                for c in self._running:
                    c.proc.wait()
                raise
            self._running.append(_Child(spec, proc))
            log.info(
                "child_started",
                hostname=spec.hostname,
                pid=proc.pid,
                metrics_port=spec.metrics_port,
                device=spec.device,
            )

    # --- signals --------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Only record it: the loop forwards it (no Popen calls from inside a signal handler)."""
        self._pending.append(signum)

    def _forward_pending(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            name = signal.Signals(signum).name
            if self._stops == 0:
                log.warning("supervisor_draining", signal=name, hint="children finish what they hold")
            else:
                log.warning("supervisor_stop_now", signal=name, hint="held events come back later")
            self._stop_all(signum)

    def _stop_all(self, signum: int) -> None:
        self._stops += 1
        for c in self._running:
            if c.returncode is None and c.proc.poll() is None:
                c.proc.send_signal(signum)

    # --- children exiting -----------------------------------------------------------------------------
    def _reap(self) -> None:
        for c in self._running:
            if c.returncode is not None or (rc := c.proc.poll()) is None:
                continue
            c.returncode = rc
            expected = self._stops > 0
            fields: dict[str, Any] = {"hostname": c.spec.hostname, "pid": c.proc.pid, "exit_code": rc}
            if expected:
                (log.info if rc == 0 else log.warning)("child_exited", how=describe(rc), **fields)
                continue
            self._failed = c
            self._kill_at = time.monotonic() + self.drain_timeout_s
            log.error(
                "child_exited_unexpectedly",
                how=describe(rc),
                **fields,
                hint=f"stopping the other workers; exiting {self._status()} so the unit is restarted",
            )
            self._stop_all(signal.SIGTERM)

    def _escalate(self) -> None:
        """After a child failure, do not wait forever for the others' drain."""
        if self._kill_at is None or time.monotonic() < self._kill_at:
            return
        self._kill_at = None
        for c in self._running:
            if c.returncode is None and c.proc.poll() is None:
                log.error("child_drain_timeout", hostname=c.spec.hostname, pid=c.proc.pid, action="SIGKILL")
                c.proc.kill()

    def _status(self) -> int:
        if self._failed is not None:
            assert self._failed.returncode is not None
            return exit_status(self._failed.returncode) or 1
        bad = [c.returncode for c in self._running if c.returncode not in (0, None)]
        return exit_status(bad[0]) if bad else 0
