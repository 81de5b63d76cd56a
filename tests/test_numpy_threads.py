"""The numpy backend's threads: pieces split exactly, pieces going to the thread that
is free, BLAS held to one thread and given back, products equal to NumPy's, and work of a
training step's size shared among the threads."""

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from engine.backends import numpy_fused, numpy_threads


def blas_threads() -> list[int]:
    """Thread counts of NumPy's BLAS (torch, once imported, brings a BLAS of its own)."""
    numpy_blas = {lib.filepath for lib in numpy_threads._blas}
    return [lib["num_threads"] for lib in threadpool_info() if lib["filepath"] in numpy_blas]


def test_one_blas_thread_limits_blas_and_gives_the_count_back_even_on_error():
    before = blas_threads()
    assert before, "NumPy's BLAS not found"
    with numpy_threads.one_blas_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    with pytest.raises(RuntimeError), numpy_threads.one_blas_thread():
        raise RuntimeError("inside")
    assert blas_threads() == before


@pytest.mark.parametrize("n, piece, min_per_thread", [(0, 4, 1), (1, 4, 1), (5, 1, 1), (1000, 64, 1),
                                                    (1000, 64, 600), (1000, 5000, 1)])
def test_parallel_pieces_covers_each_index_once_with_one_scratch_per_thread(n, piece, min_per_thread):
    seen = np.zeros(n, dtype=np.int64)
    made: list[int] = []
    lock = threading.Lock()

    def scratch(size):
        with lock:
            made.append(size)
        return (np.empty(size),)

    def body(lo, hi, buffer):
        assert 0 < hi - lo <= buffer.size
        with lock:
            seen[lo:hi] += 1

    numpy_threads.parallel_pieces(n, piece, body, min_per_thread, scratch=scratch)
    assert (seen == 1).all()
    assert len(made) <= numpy_threads.THREADS


def test_parallel_pieces_go_to_the_thread_that_is_free():
    """The calling thread is made slow: the other threads take the pieces it cannot."""
    if numpy_threads.THREADS == 1:
        pytest.skip("one thread")
    caller = threading.current_thread().name
    done: dict[str, int] = {}

    def body(lo, hi):
        me = threading.current_thread().name
        done[me] = done.get(me, 0) + 1
        time.sleep(0.1 if me == caller else 0.002)

    numpy_threads.parallel_pieces(40, 1, body)
    assert sum(done.values()) == 40
    assert done.get(caller, 0) <= 2 < 40 - done.get(caller, 0)


def test_parallel_pieces_reraises_a_worker_error():
    def body(lo, hi):
        if lo == 3:
            raise ValueError(f"piece {lo}")

    with pytest.raises(ValueError, match="piece 3"):
        numpy_threads.parallel_pieces(8, 1, body)


@pytest.mark.parametrize("M, N", [(1024, 512), (1000, 300), (600, 255)])
def test_matmul_with_a_column_split_tail_equals_numpy(M, N):
    """Products large enough for the tail (its last rows in column pieces), with b as given,
    b transposed, and a transposed (a weight gradient's xᵀ)."""
    rng = np.random.default_rng(M + N)
    a = rng.standard_normal((M, 96), dtype=np.float32)
    b = rng.standard_normal((96, N), dtype=np.float32)
    expected = a @ b
    np.testing.assert_allclose(numpy_threads.matmul(a, b), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(numpy_threads.matmul(a, np.ascontiguousarray(b.T).T), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(numpy_threads.matmul(np.ascontiguousarray(a.T).T, b), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_equals_numpy(transpose_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 70), dtype=np.float32)
    b = rng.standard_normal((90, 70), dtype=np.float32).T if transpose_b else rng.standard_normal((70, 90),
                                                                                                   dtype=np.float32)
    np.testing.assert_allclose(numpy_threads.matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)
    stack = rng.standard_normal((6, 40, 70), dtype=np.float32)
    np.testing.assert_allclose(numpy_threads.batched_matmul(stack, stack.swapaxes(-1, -2)),
                               stack @ stack.swapaxes(-1, -2), rtol=1e-5, atol=1e-5)


def test_a_layernorm_of_the_books_batch_uses_every_thread():
    """(512, 768): a 2x256 gpt2-small batch, less than one CHUNK of elements per thread."""
    if numpy_threads.THREADS == 1:
        pytest.skip("one thread")
    names = set()

    def body(lo, hi):
        names.add(threading.current_thread().name)
        time.sleep(0.02)  # a piece's work: long enough for every thread to start

    numpy_fused._over_rows(512, 768, body)
    assert len(names) == min(numpy_threads.THREADS, 512 * 768 // numpy_fused.MIN_PER_THREAD)
