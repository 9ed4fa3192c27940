"""serving/openmp_workers.py: a thread's idle OpenMP workers are freed on request (the Executor does
it for the thread that starts its loop), and torch works as before on that thread afterwards."""

import os
import threading

import pytest
import torch

from loramux.serving.openmp_workers import release_this_threads_workers


def _os_threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="counts OS threads through /proc; needs torch on 2+ threads")
def test_a_threads_openmp_pool_is_freed_and_rebuilt_on_demand():
    result = {}

    def work():
        x = torch.randn(512, 512)
        expected = x @ x  # a parallel region: this thread now has a pool of workers
        before = _os_threads()
        result["released"] = release_this_threads_workers()
        result["freed"] = before - _os_threads()
        result["same"] = torch.equal(x @ x, expected)  # the next region builds a new pool

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if not result["released"]:
        pytest.skip("torch does not run on libgomp here")
    assert result["freed"] >= 1 and result["same"]
