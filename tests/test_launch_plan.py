"""The CUDA launch packer is host code: tested here, on any machine."""
import pytest

import fusedopt
from fusedopt import _backend

C = _backend._C


def covered_chunks(launches):
    seen = []
    for tensors, slots, indices in launches:
        for slot, index in zip(slots, indices):
            seen.append((tensors[slot], index))
    return seen


@pytest.mark.parametrize("max_tensors,max_chunks", [(3, 5), (256, 2208), (1, 1), (4, 1000)])
def test_every_chunk_is_launched_once_within_capacity(max_tensors, max_chunks):
    numels = [0, 1, 100, 4096, 4097, 0, 50000, 7, 8192] * 5
    chunk = 4096
    launches = C.plan_launches(numels, chunk, max_tensors, max_chunks)
    expected = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // chunk))]
    assert covered_chunks(launches) == expected
    for tensors, slots, indices in launches:
        assert 0 < len(tensors) <= max_tensors and 0 < len(slots) <= max_chunks
        assert len(set(tensors)) == len(tensors)
        assert sorted(set(slots)) == list(range(len(tensors)))  # every slot is used


def test_a_tensor_larger_than_one_launch_continues_in_the_next():
    launches = C.plan_launches([10, 25, 3], 2, 8, 4)
    assert [t for t, _, _ in launches][:2] == [[0], [0, 1]]
    assert covered_chunks(launches) == [(0, c) for c in range(5)] + [(1, c) for c in range(13)] + [(2, 0), (2, 1)]


def test_many_small_tensors_take_few_launches():
    launches = C.plan_launches([64] * 10000, 65536, 256, 2000)
    assert len(launches) == 40


def test_planner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="negative"):
        C.plan_launches([5, -2], 4, 2, 2)
    with pytest.raises(ValueError, match="positive"):
        C.plan_launches([5], 4, 0, 2)


@pytest.mark.skipif(not fusedopt.backend_info()["cuda_compiled"], reason="built without CUDA")
def test_launch_tables_hold_hundreds_of_tensors_and_thousands_of_chunks():
    # That the tables fit in the 32 KB of kernel parameters is a static_assert in kernels.cu.
    for num_lists in (2, 3, 4, 5):
        max_tensors, max_chunks = C.cuda.launch_capacity(num_lists)
        assert max_tensors == 256 and max_chunks >= 2000
    assert C.cuda.chunk_elements % 8 == 0  # keeps 16-byte vectors aligned from chunk to chunk
