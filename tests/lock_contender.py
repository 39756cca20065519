"""A process racing for an output's lock (tests/test_output_lock.py); imports only what the lock needs."""

import os

from jobs.output.lock import OutputError, OutputLock
from jobs.output.store import OutputStore


def contend(output, run_id, environ, barrier, results, done):
    """Wait for the other processes, take the lock, report, keep it (alive) until the test has looked.

    ``environ``: the test's environment (a forkserver's children inherit the server's, not the test's).
    """
    os.environ.clear()
    os.environ.update(environ)
    lock = OutputLock(OutputStore(output), run_id)
    barrier.wait()
    try:
        lock.acquire()
        results.put((run_id, "won", lock.token))
    except OutputError as e:
        results.put((run_id, "refused", str(e)))
    except BaseException as e:  # reported to the test, which fails on it
        results.put((run_id, "crashed", repr(e)))
    done.wait(300)
