"""The runtime's threads: one pool for batch chunks and tile solves, and BLAS held to one thread.

BLAS on one thread wherever our own threads run work side by side, or wherever a solver calls
BLAS on blocks of a few hundred rows: numpy's and SciPy's OpenBLAS each keep a thread pool, and
their threads spin against each other and against ours (20x slower on two cores).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController


@functools.cache
def pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="xcompile")


@functools.cache
def _controller() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded_blas():
    """A context in which BLAS runs on one thread."""
    return _controller().limit(limits=1, user_api="blas")
