"""Busy background processes for the CPU benchmark (--busy N, --load both): how fast the
backends are when another program keeps cores busy, as on a desktop or a shared server.

Each is a fresh Python process at normal priority (the parent's nice value, not lowered) running
a **pure-Python integer loop** (a linear congruential generator): one thread, no NumPy or BLAS
(so no thread pool of its own), a few hundred bytes of memory. It competes for a core, not for
memory bandwidth or caches: what it measures is core contention, the case a thread pool that
expects every core to be free handles worst.

They start before the pass (its limits probes included) and are killed when it ends: by the
context manager's exit (normal end, an exception, Ctrl-C; runner.benchmark turns SIGTERM into
SystemExit so that exit runs too), by an atexit hook if the interpreter exits some other way,
and, if the parent is killed outright (SIGKILL), each notices within half a second that its
parent changed and exits. They are stopped (SIGSTOP) while the machine's limits are measured,
so that the limits are those of the quiet machine in every pass, and continued (SIGCONT) after.

Evidence they ran: every half second each writes how many iterations it has done and its own
CPU time; the report gives each one's iterations per second of wall time (paused time excluded)
and its CPU share (CPU time / running wall time: 1.0 = it had a core all the time), and, for
comparison, the rate of one such process measured alone for 2 s just before the pass.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The loop of a busy process. argv[1]: the file it reports to (JSON, replaced atomically).
BUSY_CODE = r"""
import json, os, sys, time
out, parent = sys.argv[1], os.getppid()
n, x, t0, last = 0, 1, time.perf_counter(), 0.0
while True:
    for _ in range(50000):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    n += 50000
    now = time.perf_counter()
    if now - last >= 0.5:
        last = now
        with open(out + ".tmp", "w") as f:
            json.dump({"iterations": n, "wall_s": now - t0, "cpu_s": time.process_time()}, f)
        os.replace(out + ".tmp", out)
        if os.getppid() != parent:
            break
"""


class Background:
    """`with Background(n, folder) as bg:` runs n busy processes; bg.report() after the block."""

    def __init__(self, n, folder, log=None):
        self.n, self.folder, self.log = n, Path(folder), log or (lambda m: None)
        self.procs, self.paused_s, self._paused_at = [], 0.0, None
        self.solo, self.started, self.ended, self.results = None, None, None, []

    # -- lifetime ----------------------------------------------------------------------------
    def __enter__(self):
        if self.n > 0:
            atexit.register(self.stop)
            self.solo = self._calibrate()
            self.log(f"starting {self.n} busy background process(es) (pure-Python loop, "
                     f"one thread each); alone one does {self.solo['rate'] / 1e6:.2f} M iterations/s")
            self.started = time.perf_counter()
            for i in range(self.n):
                self.procs.append(self._start(self.folder / f"busy-{id(self)}-{i}.json"))
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def _start(self, path):
        proc = subprocess.Popen([sys.executable, "-c", BUSY_CODE, str(path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        proc.report_path = path
        return proc

    def _calibrate(self, seconds=2.0):
        """One busy process alone for `seconds`: its iterations per second on a quiet core."""
        proc = self._start(self.folder / f"busy-solo-{id(self)}.json")
        try:
            time.sleep(seconds + 0.6)
        finally:
            _kill(proc)
        got = _read(proc.report_path) or {}
        rate = got.get("iterations", 0) / got["wall_s"] if got.get("wall_s") else 0.0
        return {"rate": rate, **got}

    def stop(self):
        """Kill the busy processes (each by its own pid) and read their last reports. Safe to
        call twice."""
        if not self.procs:
            return
        procs, self.procs = self.procs, []
        self.resume()
        self.ended = time.perf_counter()
        for proc in procs:
            _kill(proc)
        for proc in procs:
            self.results.append(_read(proc.report_path) or {"error": "no report"})
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    # -- pause while the machine's limits are measured -----------------------------------------
    def pause(self):
        if self.procs and self._paused_at is None:
            for proc in self.procs:
                _signal(proc, signal.SIGSTOP)
            self._paused_at = time.perf_counter()

    def resume(self):
        if self._paused_at is not None:
            for proc in self.procs:
                _signal(proc, signal.SIGCONT)
            self.paused_s += time.perf_counter() - self._paused_at
            self._paused_at = None

    # -- what they did -----------------------------------------------------------------------
    def report(self):
        """{"processes": n, "solo_rate", "rates" (iterations / running wall s, per process),
        "cpu_shares" (CPU s / running wall s), "paused_s", "wall_s"}; {"processes": 0} if none."""
        if self.n == 0:
            return {"processes": 0}
        rates, shares = [], []
        for r in self.results:
            running = (r.get("wall_s") or 0.0) - self.paused_s
            if r.get("iterations") and running > 0:
                rates.append(r["iterations"] / running)
                shares.append(r["cpu_s"] / running)
        return {"processes": self.n, "kind": "pure-Python integer loop, one thread, normal priority",
                "solo_rate": (self.solo or {}).get("rate"), "rates": rates, "cpu_shares": shares,
                "median_rate": statistics.median(rates) if rates else None,
                "paused_s": self.paused_s, "reports": self.results,
                "wall_s": (self.ended or time.perf_counter()) - (self.started or 0.0)}


_ACTIVE = []        # the Background objects running now (runner pauses them around limits)


def active():
    return list(_ACTIVE)


def _signal(proc, sig):
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _kill(proc):
    """End one busy process (SIGCONT first: a stopped process would not see SIGTERM)."""
    if proc.poll() is None:
        _signal(proc, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
