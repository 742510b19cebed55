"""The CUDA kernels run on the CPU (fusedopt._cuda_emulated, NOTE: [emulated CUDA] in
csrc/cuda/runtime.h), and an access checker for what they touch.

`emulated_cuda` routes the optimizers' kernel launches for CPU tensors through the
emulated CUDA launchers instead of the CPU kernels, records every load and store of
every call, and checks each call with `check_accesses`: every element of every list
read once (not at all where the kernel must only write it), params and states written
once, grads never, each access by the block and thread that own the element under the
launch plan, and no byte outside the tensors touched. Adam's and SGDW's step counters
and GradScaler's found_inf and scale are read in "device" memory too (NOTE: [device
step counters] in csrc/cuda/kernels.cu): `check_scalar_accesses` checks those.
"""
import ctypes

import numpy as np
import pytest

from fusedopt import _backend

emulated = pytest.importorskip(
    "fusedopt._cuda_emulated", reason="built only with FUSEDOPT_CUDA_EMULATION=1 (as in .ci/run)")
C = _backend._C

BLOCK_THREADS = 512  # kBlockThreads in csrc/cuda/kernels.cu
COUNTER_THREADS = 256  # kCounterThreads
COUNTERS_PER_LAUNCH = (32000 - 256) // 8  # kMaxCounters
VECTOR_BYTES = 16  # the kernels' vector loads and stores
RECORD = np.dtype([("address", "<u8"), ("bytes", "<u4"), ("write", "<u4"), ("launch", "<u4"),
                   ("block", "<u4"), ("thread", "<u4"), ("unused", "<u4")])
ELEMENT_BYTES = {C.ScalarType.float32: 4, C.ScalarType.bfloat16: 2, C.ScalarType.float16: 2}
MASTER_BYTES = {C.MasterWeights.remainder: 2, C.MasterWeights.fp32: 4}


def list_element_bytes(args, num_lists):
    """Bytes per element of each list: the param, the grad, the states, the master if any."""
    master = getattr(args, "master", C.MasterWeights.none)  # Adagrad and RMSprop keep none
    masters = [MASTER_BYTES[master]] if master != C.MasterWeights.none else []
    states = [ELEMENT_BYTES[args.state_dtype]] * (num_lists - 2 - len(masters))
    return [ELEMENT_BYTES[args.dtype], ELEMENT_BYTES[args.grad_dtype]] + states + masters


def kernel_lists(kernel_name, args):
    """The call's pointer lists in kernel order, and which of them the kernel only writes."""
    has_master = getattr(args, "master", C.MasterWeights.none) != C.MasterWeights.none
    masters = [args.masters] if has_master else []
    if kernel_name == "adam_step":
        lists = [args.params, args.grads, args.exp_avgs, args.exp_avg_sqs]
        return lists + ([args.max_exp_avg_sqs] if args.amsgrad else []) + masters, set()
    if kernel_name == "adagrad_step":
        return [args.params, args.grads, args.sums], set()
    if kernel_name == "rmsprop_step":
        lists = [args.params, args.grads, args.square_avgs]
        lists += [args.momentum_buffers] if args.momentum != 0 else []
        return lists + ([args.grad_avgs] if args.centered else []), set()
    lists = [args.params, args.grads]
    if args.momentum_mode == C.Momentum.none:
        return lists + masters, set()
    # The first step fills a freshly allocated buffer: reading it would read garbage (F6).
    return (lists + [args.momentum_buffers] + masters,
            {2} if args.momentum_mode == C.Momentum.first_step else set())


def owners(numels, lists, element_bytes, first_launch):
    """A function from (tensor, element) arrays to the (launch, block, thread) that own
    them; `element_bytes` holds each list's bytes per element."""
    chunk = emulated.active_chunk_elements()
    max_tensors, max_chunks = emulated.launch_capacity(len(lists))
    numels = np.asarray(numels, dtype=np.int64)
    chunk_base = np.concatenate([[0], np.cumsum((numels + chunk - 1) // chunk)])
    launch_of = np.full(chunk_base[-1], -1, dtype=np.int64)
    block_of = np.full(chunk_base[-1], -1, dtype=np.int64)
    for launch, (tensors, slots, indices) in enumerate(C.plan_launches(numels.tolist(), chunk, max_tensors, max_chunks)):
        flat = chunk_base[np.asarray(tensors, dtype=np.int64)[np.asarray(slots, dtype=np.int64)]] + indices
        launch_of[flat] = first_launch + launch
        block_of[flat] = np.arange(len(slots))
    addresses = np.asarray(lists, dtype=np.uint64).reshape(len(lists), -1)  # [list, tensor]
    # A vector holds as many elements as 16 bytes of the widest list.
    vector = VECTOR_BYTES // max(element_bytes)
    list_bytes = np.asarray(element_bytes, dtype=np.uint64)[:, None]

    def owner(tensor, elements):
        chunk_index = elements // chunk
        begin = chunk_index * chunk
        length = np.minimum(chunk, numels[tensor] - begin)
        # The kernel takes the vector path for a chunk only if every list's chunk start is
        # aligned to that list's vector.
        chunk_starts = addresses[:, tensor] + begin.astype(np.uint64) * list_bytes
        aligned = np.all(chunk_starts % (list_bytes * np.uint64(vector)) == 0, axis=0)
        vector_end = np.where(aligned, length - length % vector, 0)
        within = elements - begin
        thread = np.where(within < vector_end, (within // vector) % BLOCK_THREADS,
                          (within - vector_end) % BLOCK_THREADS)
        flat = chunk_base[tensor] + chunk_index
        return launch_of[flat], block_of[flat], thread

    return owner


def counted_scalars(kernel_name, args):
    """The call's step counters the kernels read and advance in device memory, and
    GradScaler's tensors they read (addresses; none for Adagrad's and RMSprop's host
    counters, which the host advances)."""
    if kernel_name not in ("adam_step", "sgdw_step"):
        return [], []
    return list(args.steps), [address for address in (args.found_inf, args.scale) if address]


def read_float(address):
    return ctypes.c_float.from_address(address).value


def skips_step(args):
    """Whether the kernels skip the whole step, as step_is_skipped in kernels.cu decides."""
    if getattr(args, "found_inf", 0) and read_float(args.found_inf) != 0:
        return True
    if getattr(args, "scale", 0):
        scale = read_float(args.scale)
        inverse = float(np.float32(1.0 / scale)) if scale > 0 else float("nan")
        return not (0 < scale < np.inf and np.finfo(np.float32).tiny <= inverse < np.inf)
    return False


def check_scalar_accesses(kernel_name, args, records, first_launch, skipped):
    """Checks the accesses to counters and GradScaler's tensors and returns the others.
    GradScaler's tensors are only read. A counter is read in the step's launches only
    by blocks of its tensor; after them, one more launch (per COUNTERS_PER_LAUNCH
    counters) reads it once and writes it at most once, by the thread that owns it,
    unless the step was skipped."""
    counters, shared = counted_scalars(kernel_name, args)
    scalar = np.isin(records["address"], np.asarray(counters + shared, dtype=np.uint64))
    if not scalar.any():
        return records
    touched = records[scalar]
    assert np.all(touched["bytes"] == 4), "a counter or GradScaler word accessed in pieces"
    is_shared = np.isin(touched["address"], np.asarray(shared, dtype=np.uint64))
    assert not touched["write"][is_shared].any(), "GradScaler's found_inf or scale written"
    lists, _ = kernel_lists(kernel_name, args)
    chunk = emulated.active_chunk_elements()
    plans = C.plan_launches(list(args.numels), chunk, *emulated.launch_capacity(len(lists)))
    advance_from = first_launch + len(plans)
    counter_index = {address: index for index, address in enumerate(counters)}
    counter = touched[~is_shared]
    addresses = np.unique(counter["address"])
    index = np.array([counter_index[int(address)] for address in addresses], dtype=np.int64)
    index = index[np.searchsorted(addresses, counter["address"])]
    launch, block, thread = (counter[field].astype(np.int64) for field in ("launch", "block", "thread"))
    in_step = launch < advance_from
    assert not counter["write"][in_step].any(), "a counter written by a step launch"
    tensor_of_block = {}
    for number, (tensors, slots, _) in enumerate(plans):
        tensor_of_block.update(((first_launch + number, b), tensors[slot]) for b, slot in enumerate(slots))
    pairs = set(zip(launch[in_step].tolist(), block[in_step].tolist(), index[in_step].tolist()))
    strays = [pair for pair in pairs if tensor_of_block.get(pair[:2]) != pair[2]]
    assert not strays, f"counters read by blocks of other tensors (launch, block, counter): {strays[:3]}"
    advancing = ~in_step
    position = index[advancing] % COUNTERS_PER_LAUNCH
    owners = np.stack([advance_from + index[advancing] // COUNTERS_PER_LAUNCH,
                       position // COUNTER_THREADS, position % COUNTER_THREADS])
    actual = np.stack([launch[advancing], block[advancing], thread[advancing]])
    assert np.array_equal(owners, actual), "a counter advanced by a thread that does not own it"
    written = counter["write"][advancing].astype(bool)
    reads = np.bincount(index[advancing][~written], minlength=len(counters))
    writes = np.bincount(index[advancing][written], minlength=len(counters))
    assert np.all(reads == (0 if skipped else 1)) and np.all(writes <= reads), (
        f"counters read {reads.tolist()[:8]} and written {writes.tolist()[:8]} times by the advance launch")
    return records[~scalar]


def check_accesses(kernel_name, args, records, first_launch, skipped=False):
    """Asserts what the module docstring says of one call; returns the elements checked.
    `skipped`: GradScaler skips the step, which then touches no element at all."""
    lists, write_only = kernel_lists(kernel_name, args)
    numels = list(args.numels)
    list_bytes = list_element_bytes(args, len(lists))
    records = check_scalar_accesses(kernel_name, args, np.frombuffer(records, dtype=RECORD),
                                    first_launch, skipped)
    if skipped:
        assert len(records) == 0, f"a skipped step touched {len(records)} elements"
        return 0
    # Each list's part of each non-empty tensor is a region; regions sorted by address.
    regions = sorted((address, address + n * list_bytes[l], l, t)
                     for l, addresses in enumerate(lists)
                     for t, (address, n) in enumerate(zip(addresses, numels)) if n)
    if not regions:
        assert len(records) == 0, "accesses in a step of only empty tensors"
        return 0
    starts, ends, region_list, region_tensor = (np.array(column) for column in zip(*regions))
    starts, ends = starts.astype(np.uint64), ends.astype(np.uint64)
    assert np.all(starts[1:] >= ends[:-1]), "tensors of one call overlap"
    region = np.searchsorted(starts, records["address"], side="right") - 1
    inside = (region >= 0) & (records["address"] + records["bytes"] <= ends[np.maximum(region, 0)])
    assert inside.all(), f"{(~inside).sum()} accesses outside every tensor, e.g. {records[~inside][:3]}"
    offsets = (records["address"] - starts[region]).astype(np.int64)
    element_bytes = np.asarray(list_bytes, dtype=np.int64)[region_list[region]]  # per record
    assert np.all(offsets % element_bytes == 0) and np.all(records["bytes"] % element_bytes == 0)

    # One row per element touched: a 16-byte vector access touches several.
    counts = (records["bytes"] // element_bytes).astype(np.int64)
    first_of_record = np.cumsum(counts) - counts
    element = np.repeat(offsets // element_bytes, counts) + np.arange(counts.sum()) - np.repeat(first_of_record, counts)
    element_region = np.repeat(region, counts)
    write = np.repeat(records["write"].astype(bool), counts)

    # Reads and writes per element of every region, against what the kernel must do.
    sizes = (ends - starts).astype(np.int64) // np.asarray(list_bytes, dtype=np.int64)[region_list]
    region_base = np.concatenate([[0], np.cumsum(sizes)])
    flat = region_base[element_region] + element
    reads = np.bincount(flat[~write], minlength=region_base[-1])
    stores = np.bincount(flat[write], minlength=region_base[-1])
    expected_reads = np.repeat([0 if l in write_only else 1 for l in region_list], sizes)
    expected_stores = np.repeat([0 if l == 1 else 1 for l in region_list], sizes)
    for what, actual, expected in (("read", reads, expected_reads), ("written", stores, expected_stores)):
        wrong = np.flatnonzero(actual != expected)
        if len(wrong):
            r = np.searchsorted(region_base, wrong[0], side="right") - 1
            raise AssertionError(
                f"list {region_list[r]} tensor {region_tensor[r]}: element {wrong[0] - region_base[r]} "
                f"{what} {actual[wrong[0]]} times, expected {expected[wrong[0]]} ({len(wrong)} such elements)")

    # Every access by the launch, block and thread that own the element.
    launch, block, thread = owners(numels, lists, list_bytes, first_launch)(
        region_tensor[element_region], element)
    for field, expected in (("launch", launch), ("block", block), ("thread", thread)):
        actual = np.repeat(records[field].astype(np.int64), counts)
        wrong = np.flatnonzero(actual != expected)
        assert not len(wrong), (f"{len(wrong)} element accesses by the wrong {field}, e.g. list "
                                f"{region_list[element_region[wrong[0]]]} element {element[wrong[0]]}")
    return int(sizes.sum())


class EmulatedCuda:
    """Launches of one test through the emulated CUDA launchers, each call checked."""

    def __init__(self):
        self.calls = 0
        self.element_checks = 0

    def target(self, device):
        """The launch target the optimizers get: this runner, for host tensors."""
        assert device.type == "cpu", "the emulated launchers take host tensors"
        return ("hook", self.launch)

    def launch(self, kernel_name, args):
        first_launch = emulated.runtime.counters()["launches"]
        skipped = skips_step(args)
        emulated.runtime.start_recording()
        try:
            getattr(emulated, kernel_name)(args, 0, 0)
        finally:
            records = emulated.runtime.stop_recording()
        self.calls += 1
        self.element_checks += check_accesses(kernel_name, args, records, first_launch, skipped)


TOTALS = {"calls": 0, "element_checks": 0}


@pytest.fixture
def emulated_cuda(monkeypatch):
    """Routes the kernel launches for CPU tensors through the emulated CUDA launchers."""
    emulated.runtime.reset()
    runner = EmulatedCuda()
    monkeypatch.setattr(_backend, "launch_target", runner.target)
    yield runner
    TOTALS["calls"] += runner.calls
    TOTALS["element_checks"] += runner.element_checks
    emulated.set_chunk_elements(0)
    emulated.runtime.reset()


@pytest.fixture(scope="module", autouse=True)
def report_totals(request):
    """Prints, once per module, how many emulated calls and element checks ran."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and TOTALS["calls"]:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nemulated CUDA ({request.module.__name__}): {TOTALS['calls']} checked "
                                f"calls, {TOTALS['element_checks']:,} element checks (reads, writes, owner)")
    TOTALS.update(calls=0, element_checks=0)


def host_args(kernel_name, tensors_per_list, **hyper):
    """Step arguments for the emulated launchers from host tensors, list by list."""
    args = {"adam_step": C.AdamStepArgs, "sgdw_step": C.SgdwStepArgs, "adagrad_step": C.AdagradStepArgs,
            "rmsprop_step": C.RmspropStepArgs}[kernel_name]()
    for name, tensors in tensors_per_list.items():
        setattr(args, name, [t.data_ptr() for t in tensors])
    first = next(iter(tensors_per_list.values()))
    args.numels = [_backend.kernel_numel(t) for t in first]
    args.dtype = args.grad_dtype = args.state_dtype = _backend.KERNEL_CODES[first[0].dtype]
    for key, value in hyper.items():
        setattr(args, key, value)
    return args

