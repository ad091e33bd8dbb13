"""Session threads kept for the next client (Workers) and the one watchdog thread of the auth lookups."""
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import smtprelay  # noqa: E402  (the module under test, from the repo root)
from test_backends import smtp_client, transaction  # noqa: E402


def threads_of(pid):
    return set(os.listdir(f"/proc/{pid}/task"))


def test_clients_one_after_another_are_served_by_the_threads_of_those_before(relay, scripted_backend):
    r = relay("--backend", scripted_backend().address, "--resolve", "off")     # no name-lookup threads
    before = threads_of(r.proc.pid)
    seen = set()
    for _ in range(10):
        client = smtp_client(r)
        assert transaction(client)[0] == 250
        seen |= threads_of(r.proc.pid) - before     # the session is open: its thread is among these
        assert client.quit()[0] == 221
    # A thread started per connection would make ten. One session may still
    # be closing when the next comes, so two threads can take turns.
    assert 1 <= len(seen) <= 2, seen


def test_clients_at_once_each_have_a_thread_of_their_own(relay, scripted_backend):
    r = relay("--backend", scripted_backend().address, "--resolve", "off")     # no name-lookup threads
    first = smtp_client(r)
    alone = threads_of(r.proc.pid)
    second = smtp_client(r)
    both = threads_of(r.proc.pid)
    assert len(both - alone) == 1
    for client in (first, second):
        assert transaction(client)[0] == 250
        assert client.quit()[0] == 221


def test_an_idle_session_thread_ends_after_worker_idle_seconds(monkeypatch):
    monkeypatch.setattr(smtprelay, "WORKER_IDLE_SECONDS", 0.2)
    workers, served = smtprelay.Workers(), threading.Event()
    workers.run(lambda: served.set())
    assert served.wait(5)
    [thread] = [t for t in threading.enumerate() if t.name == "session"]
    thread.join(5)
    assert not thread.is_alive()
    assert workers.idle == 0
    again = threading.Event()       # a new job starts a new thread
    workers.run(lambda: again.set())
    assert again.wait(5)


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
