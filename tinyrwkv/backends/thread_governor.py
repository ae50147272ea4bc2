"""How many threads decode uses, chosen while it runs, so that a busy machine never makes it collapse.

Why: a parallel region ends at a barrier, where every thread waits for the slowest. When another
program holds a core, one of our threads is off the CPU for a scheduler time slice (milliseconds)
at every barrier, and a decode step has dozens of barriers: measured on a 2-core machine with one
busy process beside it, the shipped model fell from about 600 tok/s on one thread to 3.8 tok/s on
two, and a 0.1B model to a few tok/s. On a quiet machine the same two threads are the faster
choice. No thread count is right for both, and a program cannot know in advance which machine it
will find, or when that changes.

What: decode does the same work for every token (RWKV's state has a fixed size), so the seconds a
token takes are directly comparable from one token to the next. `ThreadGovernor` uses that:

  * it decodes at its current thread count and keeps the last few token times;
  * every `period` tokens it tries its neighbours on a ladder of thread counts (1, 2, 4, ...,
    the most: halving and doubling) for PROBE_TOKENS tokens each, and moves to whichever was
    fastest on average (by more than SWITCH_MARGIN; the mean, since on a busy machine a
    collapsing count still has some fast tokens, but without the current count's slowest quarter,
    so that a preempted token or two on a quiet machine do not move it);
  * while nothing changes, the period doubles (up to LONGEST_PERIOD tokens), so that probing a
    worse count costs ~1-2% of the tokens on a steady machine; SLOW_RUN tokens in a row that take
    more than SLOWDOWN times the usual (the machine just got busy) trigger a probe at once (one
    slow token alone is the scheduler's jitter: on a quiet 2-core machine a single token often
    takes 2x, and reacting to each cost a few per cent);
  * a neighbour that was much slower (more than BACKOFF_RATIO times) is probed less often: its
    own period doubles each time (up to BACKOFF_LONGEST), since a collapsed count costs a lot per
    probe token.

Results do not depend on the thread count (each output row and WKV head is one thread's
sequential loop: tests/test_numba_decode.py checks it), so switching never changes the text.

The governor only decides; the caller sets Numba's thread count (`numba.set_num_threads`, which
is per calling thread and cheap) and times the token. `threads=N` on load fixes N and no governor
is used.
"""

from __future__ import annotations

import statistics
from collections import deque

PROBE_TOKENS = 3          # tokens decoded at a neighbour count per probe
FIRST_PERIOD = 4          # tokens before the first probe, and after a change
LONGEST_PERIOD = 128      # tokens between probes on a steady machine
SWITCH_MARGIN = 0.95      # move when a neighbour takes less than this fraction of the time
SLOWDOWN = 2.0            # SLOW_RUN tokens in a row this many times slower than usual ...
SLOW_RUN = 2              # ... trigger a probe now
BACKOFF_RATIO = 2.0       # a neighbour this many times slower is probed less often ...
BACKOFF_LONGEST = 4096    # ... at most every this many tokens
KEEP = 8                  # token times kept per thread count


def thread_ladder(most):
    """1, 2, 4, ... up to `most`, and `most` itself: the counts the governor moves between."""
    ladder, n = [], 1
    while n < most:
        ladder.append(n)
        n *= 2
    return ladder + [most]


class ThreadGovernor:
    """Picks the thread count for each decode step from the measured time of recent steps.

        governor = ThreadGovernor(most=os.cpu_count())
        n = governor.threads()          # before a token: use n threads
        ...decode one token, timed...
        governor.record(n, seconds)     # after it

    `history` keeps every change as (token number, old count, new count, reason), for tests and
    for anyone asking why decode runs on the threads it does.
    """

    def __init__(self, most, start=None):
        if most < 1:
            raise ValueError(f"most must be at least 1, not {most}")
        self.ladder = thread_ladder(int(most))
        self.index = self.ladder.index(start) if start in self.ladder else len(self.ladder) - 1
        self.times = {n: deque(maxlen=KEEP) for n in self.ladder}
        self.period = FIRST_PERIOD
        self.until_probe = FIRST_PERIOD
        self.probe_plan = []               # thread counts of the probe tokens still to run
        self.probe_times = {}              # thread count -> times seen in this probe
        self.neighbour_wait = {}           # thread count -> probes to skip (back-off)
        self.neighbour_skip = {}           # thread count -> current back-off length
        self.slow_run = 0                  # tokens in a row slower than SLOWDOWN x the usual
        self.tokens = 0
        self.history = []

    @property
    def current(self):
        return self.ladder[self.index]

    def threads(self):
        """The thread count for the next token."""
        return self.probe_plan[0] if self.probe_plan else self.current

    def record(self, threads, seconds):
        """The time of the token just decoded with `threads` threads."""
        self.tokens += 1
        if self.probe_plan:
            self.probe_plan.pop(0)
            self.probe_times.setdefault(threads, []).append(seconds)
            if not self.probe_plan:
                self._decide()
            return
        usual = self.times[threads]
        slow = len(usual) >= 3 and seconds > SLOWDOWN * statistics.median(usual)
        self.slow_run = self.slow_run + 1 if slow else 0
        if self.slow_run >= SLOW_RUN:
            self.until_probe = 0                           # the machine changed: look now,
            self.period = FIRST_PERIOD                     # and forget how it was
            self.neighbour_wait.clear()
            self.slow_run = 0
            recent = list(usual)[-(SLOW_RUN - 1):] if SLOW_RUN > 1 else []
            usual.clear()
            usual.extend(recent)                           # the slow tokens, as they are now
        usual.append(seconds)
        self.until_probe -= 1
        if self.until_probe <= 0:
            self._plan_probe()

    def _plan_probe(self):
        plan = []
        for j in (self.index - 1, self.index + 1):
            if 0 <= j < len(self.ladder):
                n = self.ladder[j]
                if self.neighbour_wait.get(n, 0) > 0:
                    self.neighbour_wait[n] -= 1
                    continue
                plan += [n] * PROBE_TOKENS
        self.probe_plan, self.probe_times = plan, {}
        if not plan:                                       # every neighbour is backed off
            self._wait()

    def _decide(self):
        # Means, not medians or minima: what a thread count costs is its average token, and on a
        # busy machine a collapsing count has fast tokens too (when the other program sleeps).
        seen = {n: statistics.fmean(ts) for n, ts in self.probe_times.items()}
        own = sorted(self.times[self.current])
        seen[self.current] = statistics.fmean(own[:len(own) - len(own) // 4])  # top quarter off
        mine = seen[self.current]
        best = min(seen, key=seen.get)
        if seen[best] >= SWITCH_MARGIN * mine:
            best = self.current
        for n, t in seen.items():          # counts much slower than the best: look less often
            if n != best and t > BACKOFF_RATIO * seen[best]:
                skip = min(2 * self.neighbour_skip.get(n, 1), BACKOFF_LONGEST // LONGEST_PERIOD)
                self.neighbour_skip[n] = self.neighbour_wait[n] = skip
            else:
                self.neighbour_skip.pop(n, None)
        if best != self.current:
            self.history.append((self.tokens, self.current, best,
                                 f"{mine * 1e3:.2f} ms/token -> {seen[best] * 1e3:.2f}"))
            self.index = self.ladder.index(best)
            self.times[best].clear()
            self.times[best].extend(self.probe_times[best])
            self.period = FIRST_PERIOD
        else:
            self.period = min(2 * self.period, LONGEST_PERIOD)
        self._wait()

    def _wait(self):
        self.until_probe = self.period

    def describe(self):
        """e.g. 'auto: 2 of 1-2 threads' (what a status line shows)."""
        return f"auto: {self.current} of {self.ladder[0]}-{self.ladder[-1]} threads"
