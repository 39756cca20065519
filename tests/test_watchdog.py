"""The stall watchdog: a pipeline that stops producing ends the run, and leaves no thread behind inside Ray.

A thread still blocked in Ray Data when the interpreter shuts down can crash the process, which turned a
stalled run's exit 1 into a segfault (-11) once in CI. These tests hold a real source (a generator, then a real
Ray Data execution on the session's Ray) and check that the run's clean-up ends the pulling thread.
"""

import threading
import time

import pytest

from jobs.errors import PipelineStalled
from jobs.run.pipeline import stop_execution
from jobs.run.watchdog import StallWatch


def held_source(release: threading.Event, first: int = 2):
    """Yield ``first`` items, then block until ``release`` is set, then yield one more."""
    yield from range(first)
    release.wait()
    yield first


def test_a_source_that_stops_producing_raises_after_the_timeout_and_its_thread_ends_once_released():
    release = threading.Event()
    watch = StallWatch(held_source(release), stall_s=0.5)
    assert [next(watch), next(watch)] == [0, 1]
    start = time.monotonic()
    with pytest.raises(PipelineStalled, match=r"no scan was scored for 0\.5 s \(--stall-timeout-s\)"):
        next(watch)
    assert 0.4 < time.monotonic() - start < 5
    assert watch.close(timeout_s=0.2) is False, "the thread is still held inside its source"
    release.set()  # the source moves on: the thread must not wait to hand over a batch nobody takes
    assert watch.close(timeout_s=5) is True


def test_without_a_timeout_the_batches_are_iterated_directly():
    watch = StallWatch(iter(range(5)), stall_s=0)
    assert list(watch) == [0, 1, 2, 3, 4]
    assert watch.close(timeout_s=0) is True, "no thread was started, so none is left"


def test_an_error_in_the_source_is_raised_in_the_callers_thread():
    def failing():
        yield 1
        raise OSError("mount gone")

    watch = StallWatch(failing(), stall_s=5)
    assert next(watch) == 1
    with pytest.raises(OSError, match="mount gone"):
        next(watch)
    assert watch.close(timeout_s=5) is True


def test_a_stalled_ray_data_execution_is_stopped_and_its_reading_thread_ends(ray_cluster, tmp_path):
    """The real case: one block's task hangs; after the stall, stopping the execution ends the pulling thread
    while the task is still held (nothing releases it)."""
    import ray

    never = str(tmp_path / "never")

    def hang_on_the_last(batch):
        if int(batch["id"].max()) == 7:
            while not __import__("os").path.exists(never):
                __import__("time").sleep(0.1)
        return {"id": batch["id"] * 2}

    dataset = ray.data.range(8, override_num_blocks=8).map_batches(hang_on_the_last, batch_size=None, num_cpus=0.5)
    batches = dataset.iter_batches(batch_size=None, batch_format="numpy")
    watch = StallWatch(batches, stall_s=8)
    seen = []
    with pytest.raises(PipelineStalled):
        for batch in watch:
            seen.extend(batch["id"].tolist())
    assert seen and 14 not in seen, "blocks arrived, the held one did not"
    assert watch.close(timeout_s=0.5) is False, "before the execution is stopped, the thread waits inside Ray"
    stop_execution(dataset)
    assert watch.close(timeout_s=10) is True, "stopping the execution ended the thread that pulled its batches"
    # Ray Data works on afterwards (its blocks may come back in any order: preserve_order is off by default).
    assert sorted(ray.data.range(3).map_batches(lambda b: b, batch_size=None).to_pandas()["id"]) == [0, 1, 2]
