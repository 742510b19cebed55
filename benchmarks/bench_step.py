"""Optimizer-step benchmark: fusedopt against torch.optim's fused and foreach paths.

For each workload (a list of parameter shapes) and optimizer row, every
implementation steps its own copy of the same random data; steps are timed round
by round, one step per implementation per round, so drift hits all alike. The
report gives the median step time, the effective bandwidth (the bytes a step must
move divided by its time, docs/DESIGN.md 4), that bandwidth as a share of a copy
measured in the same run, and the time ratio against torch's fused optimizer (its
foreach one for RMSprop, which has no fused path).

    python benchmarks/bench_step.py --device cpu --quick --json out.json --plot out.png
"""
import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import fusedopt

MiB = 1 << 20


def gpt2_shapes(layers):
    """GPT-2 small with `layers` blocks (12 in the real model); Conv1D weights are (in, out)."""
    d, vocab, context = 768, 50257, 1024
    block = [(d,), (d,),  # ln_1
             (d, 3 * d), (3 * d,), (d, d), (d,),  # attn.c_attn, attn.c_proj
             (d,), (d,),  # ln_2
             (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # mlp.c_fc, mlp.c_proj
    return [(vocab, d), (context, d)] + block * layers + [(d,), (d,)]


def llama_shapes(layers):
    """Decoder layers of Llama-3.2-1B: hidden 2048, MLP 8192, 32 query / 8 kv heads of 64."""
    hidden, mlp, kv = 2048, 8192, 8 * 64
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
             (mlp, hidden), (mlp, hidden), (hidden, mlp),  # gate, up, down
             (hidden,), (hidden,)]  # the two RMSNorms
    return layer * layers


@dataclass(frozen=True)
class Workload:
    name: str
    gpu: list  # parameter shapes
    cpu: list = None  # scaled down to fit a CPU's memory and time; None: as on a GPU
    quick_cpu: list = None  # for --quick on a CPU; None: as `cpu`

    def shapes(self, device_type, quick):
        if device_type == "cuda":
            return self.gpu
        cpu = self.cpu or self.gpu
        return (self.quick_cpu or cpu) if quick else cpu


WORKLOADS = [
    Workload("large", [(1 << 24,)] * 10, cpu=[(1 << 23,)] * 4, quick_cpu=[(1 << 22,)] * 4),
    Workload("gpt2-124m", gpt2_shapes(12), quick_cpu=gpt2_shapes(2)),
    Workload("llama-layers", llama_shapes(16), cpu=llama_shapes(2), quick_cpu=llama_shapes(1)),
    Workload("many-4k", [(4096,)] * 2000),  # the foundation issue's CPU target shape
    Workload("mid", [(1024,)] * 1000),
    Workload("tiny", [(64,)] * 10_000),
]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class OptimizerSpec:
    label: str
    dtype: torch.dtype  # of params, grads and states alike
    fusedopt_class: type
    torch_class: type
    hyper: dict
    states: int  # state tensors shaped like the param
    baseline: str = "torch-fused"  # the implementation the time ratio compares with
    fusedopt_options: dict = field(default_factory=dict)  # fusedopt's own arguments
    # Bytes per param a step must move where the states are not of the params' dtype.
    floor_bytes_per_param: int = None
    impls: tuple = None  # the implementations that take this row's options; None: all

    @property
    def key(self):
        return f"{self.label}-{DTYPE_NAMES[self.dtype]}"

    @property
    def floor_bytes(self):
        """Bytes per param a step must move: read p, g and each state; write p and each state."""
        return self.floor_bytes_per_param or (3 + 2 * self.states) * self.dtype.itemsize


ADAM = dict(lr=1e-3, weight_decay=1e-2)
# SGDW decays decoupled (p *= 1 - lr*wd), torch's SGD as L2; both move the same bytes.
SGD = dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)
ADAGRAD = dict(lr=1e-2, lr_decay=1e-4, weight_decay=1e-2)
RMSPROP = dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2)
OPTIMIZERS = [
    OptimizerSpec("adamw", torch.float32, fusedopt.AdamW, torch.optim.AdamW, ADAM, states=2),
    OptimizerSpec("adamw", torch.bfloat16, fusedopt.AdamW, torch.optim.AdamW, ADAM, states=2),
    # bf16 params with exact fp32 masters: fusedopt reads and writes the param, its
    # 16-bit remainder and the fp32 moments (2+2+4+4 bytes each way) and reads the
    # grad (2); torch's nearest equivalent steps fp32 master params with its fused
    # AdamW and casts grads up and params down around it (FP32_MASTER_BYTES).
    OptimizerSpec("adamw-master", torch.bfloat16, fusedopt.AdamW, torch.optim.AdamW, ADAM, states=2,
                  baseline="torch-fused-fp32-master", fusedopt_options=dict(master_weights=True),
                  floor_bytes_per_param=26, impls=("fusedopt", "torch-fused-fp32-master")),
    # bf16 params rounded stochastically, the bytes of the plain bf16 row: its baseline is
    # fusedopt rounding to nearest, side by side, so the ratio is the random bits' cost.
    OptimizerSpec("adamw-sr", torch.bfloat16, fusedopt.AdamW, torch.optim.AdamW, ADAM, states=2,
                  baseline="fusedopt-nearest",
                  fusedopt_options=dict(stochastic_rounding=True, rounding_seed=0),
                  impls=("fusedopt", "fusedopt-nearest", "torch-fused")),
    OptimizerSpec("adam-l2", torch.float32, fusedopt.Adam, torch.optim.Adam, ADAM, states=2),
    OptimizerSpec("sgdw-momentum", torch.float32, fusedopt.SGDW, torch.optim.SGD, SGD, states=1),
    OptimizerSpec("adagrad", torch.float32, fusedopt.Adagrad, torch.optim.Adagrad, ADAGRAD, states=1),
    # torch.optim.RMSprop has no fused path: its foreach one is the fastest it has.
    OptimizerSpec("rmsprop-centered-momentum", torch.float32, fusedopt.RMSprop, torch.optim.RMSprop,
                  RMSPROP, states=3, baseline="torch-foreach"),
]

# How each implementation builds its optimizer. One that raises is reported as n/a;
# backend="kernel" raises where fusedopt has no kernel, so the reference is never
# timed under the kernel's name.
class Fp32MasterStep:
    """torch's way to step low-precision params through fp32 masters: the grads cast
    into the masters' fp32 grads, torch's fused step on the masters, the masters cast
    back into the params. Bytes per param: 2 + 4 for the grads, 28 for the fused step
    on fp32, 4 + 2 for the params: FP32_MASTER_BYTES."""

    def __init__(self, spec, params):
        self.params = params
        self.masters = [param.detach().float().requires_grad_() for param in params]
        for master in self.masters:
            master.grad = torch.empty_like(master)
        self.inner = spec.torch_class(self.masters, **spec.hyper, fused=True)
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        self.model_tensors = params + [param.grad for param in params]

    @torch.no_grad()
    def step(self):
        torch._foreach_copy_([master.grad for master in self.masters], [p.grad for p in self.params])
        self.inner.step()
        torch._foreach_copy_(self.params, self.masters)


FP32_MASTER_BYTES = 40

IMPLEMENTATIONS = {
    "fusedopt": lambda spec, params: spec.fusedopt_class(
        params, **spec.hyper, **spec.fusedopt_options, backend="kernel"),
    "torch-fused": lambda spec, params: spec.torch_class(params, **spec.hyper, fused=True),
    "torch-fused-fp32-master": Fp32MasterStep,
    "torch-foreach": lambda spec, params: spec.torch_class(params, **spec.hyper, foreach=True),
    "fusedopt-nearest": lambda spec, params: spec.fusedopt_class(
        params, **spec.hyper, backend="kernel"),  # without the row's own options
    "fusedopt-reference": lambda spec, params: spec.fusedopt_class(
        params, **spec.hyper, **spec.fusedopt_options, backend="reference"),
}
DEFAULT_IMPLS = ["fusedopt", "torch-fused", "torch-foreach"]
QUICK_IMPLS = ["fusedopt", "torch-fused"]


@dataclass(frozen=True)
class Settings:
    warmup: int  # untimed steps per implementation, which also make the states non-zero
    rounds: int  # timed steps per implementation, at most
    copy_bytes: int  # the copy buffer, far larger than any cache
    # After MIN_ROUNDS, a row stops once its rounds took this long: on a busy machine
    # OpenMP barriers can make one torch step over thousands of tensors take seconds.
    row_seconds: float
    shrink: int = 1  # every dimension divided by this (smoke test only)


MIN_ROUNDS = 3


def settings_for(device_type, quick, smoke):
    if smoke:
        return Settings(warmup=1, rounds=MIN_ROUNDS, copy_bytes=16 * MiB, row_seconds=1, shrink=16)
    if device_type == "cuda":
        return Settings(warmup=5, rounds=30 if quick else 100, copy_bytes=1024 * MiB,
                        row_seconds=5.0 if quick else 30.0)
    if quick:
        return Settings(warmup=1, rounds=8, copy_bytes=256 * MiB, row_seconds=1.0)
    return Settings(warmup=3, rounds=30, copy_bytes=256 * MiB, row_seconds=30.0)


def last_level_cache_bytes(device):
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 256 * MiB
    units = {"K": 1 << 10, "M": 1 << 20}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as file:
            text = file.read().strip()  # e.g. "32768K"
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 * MiB)


class Clock:
    """Times one call: CUDA events around it on a GPU, perf_counter on a CPU. Before each
    call it overwrites a buffer twice the last-level cache, so every step starts cold as
    after a backward pass, whichever implementation ran before it."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(2 * last_level_cache_bytes(device), dtype=torch.uint8,
                                 device=device)
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def seconds(self, call):
        self.flush.zero_()
        if not self.cuda:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
        # Synchronizing first puts the host's launch overhead inside the timed span.
        torch.cuda.synchronize()
        self.start.record()
        call()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def bandwidths(clock, device, settings):
    """GB/s (bytes read + written) of a copy and of an in-place update. The copy is the
    ceiling; on a CPU it also reads its target before writing it (write-allocate), which
    an in-place update such as an optimizer step does not, so the second number shows
    how far above the copy such updates can go."""
    source = torch.randn(settings.copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    results = []
    for call in (lambda: target.copy_(source), lambda: source.mul_(1.0)):
        times = [clock.seconds(call) for _ in range(settings.warmup + max(settings.rounds, 10))]
        results.append(2 * settings.copy_bytes / statistics.median(times[settings.warmup:]) / 1e9)
    return results


@dataclass
class Run:
    impl: str
    optimizer: object = None
    times: list = field(default_factory=list)
    peak_memory_bytes: int = None
    error: str = None


def tensor_bytes(optimizer):
    """Bytes of the params, grads and state tensors `optimizer` holds (and of the model's
    own params and grads where it steps copies of them)."""
    total = sum(t.nbytes for t in getattr(optimizer, "model_tensors", ()))
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            tensors = [param, param.grad, *(t for t in state.values() if torch.is_tensor(t))]
            total += sum(t.nbytes for t in tensors if t is not None)
    return total


def release(optimizer):
    """Frees the optimizer's tensors now: torch's optimizers sit in reference cycles,
    which would keep params and states alive until the next garbage collection."""
    optimizer.state.clear()
    optimizer.param_groups.clear()


def start_run(impl, spec, source, warmup):
    """Copies the source data, builds the optimizer and takes the warm-up steps."""
    run = Run(impl)
    device = source[0][0].device
    cuda = device.type == "cuda"
    if cuda:
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        params = [param.to(spec.dtype, copy=True) for param in source[0]]
        for param, grad in zip(params, source[1]):
            param.grad = grad.to(spec.dtype, copy=True)
        run.optimizer = IMPLEMENTATIONS[impl](spec, params)
        for _ in range(warmup):
            run.optimizer.step()
    except Exception as error:  # an unsupported dtype, device or option: n/a, not a crash
        if run.optimizer is not None:
            release(run.optimizer)
        run.optimizer, run.error = None, f"{type(error).__name__}: {error}"
        return run
    if cuda:
        torch.cuda.synchronize(device)
        run.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - allocated_before
    else:
        run.peak_memory_bytes = tensor_bytes(run.optimizer)
    return run


def bench_row(workload, source, spec, impls, clock, settings, copy_gbps):
    """Times every implementation on its own copy of `source`, round by round, and the
    optimizer's baseline with them; returns rows."""
    impls = [impl for impl in impls if spec.impls is None or impl in spec.impls]
    impls = impls + [spec.baseline] * (spec.baseline not in impls)
    runs = [start_run(impl, spec, source, settings.warmup) for impl in impls]
    started = time.perf_counter()
    for round_index in range(settings.rounds):
        if round_index >= MIN_ROUNDS and time.perf_counter() - started > settings.row_seconds:
            break
        for run in runs:
            if run.error is None:
                try:
                    run.times.append(clock.seconds(run.optimizer.step))
                except Exception as error:
                    run.error = f"{type(error).__name__}: {error}"
    for run in runs:
        if run.optimizer is not None:
            release(run.optimizer)
    numel = sum(param.numel() for param in source[0])
    medians = {run.impl: statistics.median(run.times) if run.error is None else None
               for run in runs}
    rows = []
    for run in runs:
        median, baseline = medians[run.impl], medians[spec.baseline]
        bytes_per_param = FP32_MASTER_BYTES if run.impl == "torch-fused-fp32-master" else spec.floor_bytes
        gbps = bytes_per_param * numel / median / 1e9 if median else None
        rows.append({
            "workload": workload, "tensors": len(source[0]), "numel": numel,
            "optimizer": spec.label, "dtype": DTYPE_NAMES[spec.dtype], "impl": run.impl,
            "median_ms": median * 1e3 if median else None,
            "gbps": gbps,
            "percent_of_copy": 100 * gbps / copy_gbps if gbps else None,
            "baseline": spec.baseline,
            "ratio_vs_baseline": baseline / median if median and baseline else None,
            "floor_bytes_per_param": bytes_per_param,
            "peak_memory_bytes": run.peak_memory_bytes,
            "peak_memory_bytes_per_param": (run.peak_memory_bytes / numel
                                            if run.peak_memory_bytes is not None else None),
            "num_threads": torch.get_num_threads(),
            "steps": len(run.times),
            "error": run.error,
        })
    return rows


class StderrCounter:
    """The part of tqdm's interface used here, for when tqdm is not installed."""

    def __init__(self, total):
        self.total, self.done, self.text = total, 0, ""

    def set_description(self, text):
        self.text = text
        print(f"\r[{self.done}/{self.total}] {text:<40}", end="", file=sys.stderr, flush=True)

    def update(self):
        self.done += 1
        self.set_description(self.text)

    def close(self):
        print(file=sys.stderr)


def progress_bar(total):
    try:
        from tqdm import tqdm
    except ImportError:
        return StderrCounter(total)
    return tqdm(total=total, unit="row", file=sys.stderr)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def format_table(report):
    header = ["workload", "tensors", "params", "optimizer", "dtype", "impl", "median ms",
              "GB/s", "% of copy BW", "vs baseline"]
    scaled = {name for name, info in report["workloads"].items() if info["scaled"]}
    lines = [header]
    for row in report["rows"]:
        lines.append([
            row["workload"] + ("*" if row["workload"] in scaled else ""), str(row["tensors"]),
            f"{row['numel'] / 1e6:.1f}M", row["optimizer"], row["dtype"], row["impl"],
            *(f"{row[key]:{spec}}" if row[key] is not None else "n/a" for key, spec in (
                ("median_ms", ".3f"), ("gbps", ".1f"), ("percent_of_copy", ".0f"),
                ("ratio_vs_baseline", ".2f"))),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |"
            for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    settings = report["settings"]
    notes = [f"\n{report['device']} ({report['device_type']}, {report['num_threads']} threads), "
             f"torch {report['torch']}, fusedopt {report['fusedopt']}; "
             f"copy {report['copy_gbps']:.1f} GB/s, in-place update {report['inplace_gbps']:.1f} "
             f"GB/s; median of {MIN_ROUNDS}-{settings['rounds']} steps after "
             f"{settings['warmup']} warm-up steps; baseline: torch-fused, or torch-foreach where "
             "torch has no fused path (RMSprop), torch's fp32-master recipe for master weights, "
             "fusedopt rounding to nearest for stochastic rounding."]
    if scaled:
        notes.append("* scaled down from the GPU workload; params and tensors are what ran.")
    if report["load_average_before"] > 0.25 * os.cpu_count():
        # torch's OpenMP threads spin-wait at barriers: a busy machine slows its steps over
        # many tensors most, by up to 1000x.
        notes.append(f"Load average {report['load_average_before']:.1f} on {os.cpu_count()} CPUs "
                     "before the run: other processes compete, timings are unreliable.")
    return "\n".join(text + notes)


def write_plot(path, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = list(dict.fromkeys((row["optimizer"], row["dtype"]) for row in rows))
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    gbps = {(r["workload"], r["optimizer"], r["dtype"], r["impl"]): r["gbps"] for r in rows}
    columns = min(2, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False, sharey=True, layout="constrained",
                                figsize=(7 * columns, 4.2 * lines + 0.6))
    width = 0.8 / len(impls)
    for axis, (optimizer, dtype) in zip(axes.flat, panels):
        for index, impl in enumerate(impls):
            values = [gbps.get((workload, optimizer, dtype, impl)) for workload in workloads]
            offset = (index - (len(impls) - 1) / 2) * width
            bars = axis.bar([x + offset for x in range(len(workloads))],
                            [value or 0 for value in values], width, label=impl, color=f"C{index}")
            # Labels keep the small workloads' bars readable next to the large ones.
            axis.bar_label(bars, [f"{v:.3g}" if v is not None else "n/a" for v in values],
                           fontsize=7, rotation=90, padding=2)
        axis.axhline(report["copy_gbps"], color="black", linestyle="--",
                     label=f"copy {report['copy_gbps']:.0f} GB/s")
        axis.axhline(report["inplace_gbps"], color="gray", linestyle=":",
                     label=f"in-place update {report['inplace_gbps']:.0f} GB/s")
        axis.set_title(f"{optimizer} {dtype}")
        axis.set_xticks(range(len(workloads)), [
            f"{name}\n{report['workloads'][name]['numel'] / 1e6:.1f}M params" for name in workloads])
        axis.grid(axis="y", alpha=0.3)
        axis.margins(y=0.12)  # room for the value labels above the tallest bar
    for axis in axes[:, 0]:
        axis.set_ylabel("effective GB/s (floor bytes / step time)")
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    figure.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center",
                  ncol=len(impls) + 2)
    figure.suptitle(f"Optimizer step bandwidth: {report['device']}, torch {report['torch']}, "
                    f"fusedopt {report['fusedopt']}")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", metavar="LIST",
                        help=f"comma-separated subset of {','.join(w.name for w in WORKLOADS)}")
    parser.add_argument("--optimizers", metavar="LIST",
                        help=f"comma-separated subset of {','.join(o.key for o in OPTIMIZERS)}")
    parser.add_argument("--impls", metavar="LIST",
                        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)} (default "
                        f"{','.join(DEFAULT_IMPLS)}; with --quick {','.join(QUICK_IMPLS)})")
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller CPU workloads")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the bandwidths (matplotlib)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests only
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  -- fail now, not after the whole run
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")

    def pick(text, options, default):
        if text is None:
            return default
        names = text.split(",")
        unknown = [name for name in names if name not in options]
        if unknown:
            parser.error(f"unknown {unknown}; choose from {','.join(options)}")
        return [options[name] for name in names]

    args.workloads = pick(args.workloads, {w.name: w for w in WORKLOADS}, WORKLOADS)
    args.optimizers = pick(args.optimizers, {o.key: o for o in OPTIMIZERS}, OPTIMIZERS)
    args.impls = pick(args.impls, {name: name for name in IMPLEMENTATIONS},
                      QUICK_IMPLS if args.quick or args.smoke else DEFAULT_IMPLS)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    settings = settings_for(device.type, args.quick, args.smoke)
    clock = Clock(device)
    copy_gbps, inplace_gbps = bandwidths(clock, device, settings)
    report = {
        "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "fusedopt": fusedopt.__version__,
        "backend_info": fusedopt.backend_info(), "num_threads": torch.get_num_threads(),
        "command": shlex.join(["python", "benchmarks/bench_step.py", *argv]),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**vars(settings), "timer": "cuda events" if clock.cuda else "perf_counter",
                     "cache_flush_bytes": clock.flush.numel()},
        "peak_memory": ("torch.cuda.max_memory_allocated during warm-up, minus what was allocated "
                        "before" if clock.cuda else "bytes of params, grads and optimizer state"),
        "copy_gbps": copy_gbps, "inplace_gbps": inplace_gbps,
        "load_average_before": load_before,
        "workloads": {}, "rows": [],
    }
    bar = progress_bar(len(args.workloads) * len(args.optimizers))
    for workload in args.workloads:
        shapes = [tuple(-(-size // settings.shrink) for size in shape)
                  for shape in workload.shapes(device.type, args.quick or args.smoke)]
        report["workloads"][workload.name] = {
            "tensors": len(shapes), "numel": sum(math.prod(shape) for shape in shapes),
            "scaled": shapes != workload.gpu,
            "gpu_tensors": len(workload.gpu), "gpu_numel": sum(map(math.prod, workload.gpu)),
        }
        # Random, never zero: params ~ N(0, 1), grads ~ N(0, 1e-3^2).
        source = ([torch.randn(shape, device=device) for shape in shapes],
                  [torch.randn(shape, device=device).mul_(1e-3) for shape in shapes])
        for spec in args.optimizers:
            bar.set_description(f"{workload.name} {spec.key}")
            report["rows"] += bench_row(workload.name, source, spec, args.impls, clock, settings,
                                        copy_gbps)
            bar.update()
        del source
    bar.close()
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)
    if args.plot:
        write_plot(args.plot, report)


if __name__ == "__main__":
    main()
