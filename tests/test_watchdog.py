"""The one watchdog thread of the auth lookups' whole-answer deadlines."""
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import smtprelay  # noqa: E402  (the module under test, from the repo root)


class Watched:
    def __init__(self):
        self.done, self.cut_at = False, threading.Event()

    def cut(self):
        self.cut_at.set()


def test_the_watchdog_cuts_what_outstays_its_deadline_and_not_what_left_in_time():
    watchdog = smtprelay.Watchdog()
    left, stays, later = Watched(), Watched(), Watched()
    watchdog.watch(0.2, left)
    left.done = True
    watchdog.watch(0.3, stays)
    watchdog.watch(0.5, later)
    assert stays.cut_at.wait(5)
    assert later.cut_at.wait(5)         # past left's deadline too
    assert not left.cut_at.is_set()
    assert watchdog.thread.is_alive()   # one thread for all, still there for the next


def test_an_earlier_deadline_wakes_the_watchdog_sooner():
    watchdog = smtprelay.Watchdog()
    slow, fast = Watched(), Watched()
    watchdog.watch(30, slow)
    watchdog.watch(0.1, fast)
    assert fast.cut_at.wait(5)
    assert not slow.cut_at.is_set()
