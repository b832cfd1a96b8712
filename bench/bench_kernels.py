"""The rollout kernels at Nemotron-H-8B shapes (128 heads, headdim 64, dstate 128, 8 groups, chunk 128).

    python -m bench.bench_kernels              # on a CUDA machine
    python -m bench.bench_kernels --cpu-smoke  # the same code paths at tiny shapes, Triton's CPU interpreter
    python -m bench.bench_kernels --tune       # each launch variant of the kernels, prefill's time per kernel

(a) Decode: ``selective_state_update`` (fp32 state, bf16 x/dt/B/C) at batch 1, 2, 4, ..., 256. Median time
    over many iterations (CUDA events, after warmup, L2 flushed before each so that small batches are not
    served from cache), bytes moved (state read and write, inputs, output), achieved GB/s and % of the peak
    HBM bandwidth, which is measured here by a large device-to-device copy, not taken from a spec sheet. Beside
    it, steps back to back in a CUDA graph, as the engine runs them, and copies of the state's bytes run the
    same way: at small batch a launch's fixed cost bounds any kernel, and the copy shows by how much.
(b) Prefill: ``ssd_scan`` against mamba_ssm's ``mamba_chunk_scan_combined`` at batch 4 × 8,192 tokens,
    bf16 inputs: both times and their ratio (mamba_ssm: ``MAMBA_SKIP_CUDA_BUILD=TRUE pip install
    --no-build-isolation mamba-ssm``; skipped when missing). Each call is timed alone, from an idle device,
    so the host's work before the first kernel counts; ``queued_ms`` also times calls issued back to back,
    where it hides behind the call before, as in a model's forward.

(c) Decode attention: ``decode_attention`` (bf16, Nemotron-H-8B's 32 query heads on 8 KV heads of 128) at
    batch 1, 8 and 64 over contexts of 1,024 and 8,192 tokens, every row at its last position: time and %
    of peak bandwidth (keys and values read once), beside its PyTorch reference's time.

Every part also prints the largest difference from the PyTorch reference (relative to its largest value), so
a GPU run checks correctness too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass, fields
from datetime import datetime
from functools import partial
from itertools import product
from typing import Callable, Iterator

# Triton reads TRITON_INTERPRET when it is first imported, so the smoke mode sets it before torch and Triton load.
if "--cpu-smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from rollout.kernels import (decode_attention_ref, decode_attention_triton,  # noqa: E402
                             selective_state_update_ref, selective_state_update_triton, ssd_scan_ref, ssd_scan_triton)
from rollout.kernels import attention as attention_module  # noqa: E402
from rollout.kernels import state_update  # noqa: E402

MAMBA_INSTALL = "MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation mamba-ssm"


@dataclass(frozen=True)
class Setup:
    """Shapes and timing budget of one run."""

    device: str
    nheads: int
    headdim: int
    dstate: int
    ngroups: int
    chunk_size: int
    decode_batches: tuple[int, ...]
    prefill_batch: int
    prefill_len: int
    kv_heads: int       # the decode attention's heads: KV heads, query heads, head dim
    query_heads: int
    attention_dim: int
    attention_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    copy_bytes: int     # the peak-bandwidth copy
    flush_bytes: int    # written before each timed run to evict the L2 cache (50 MB on H100)
    warmup: int
    iters: int


NEMOTRON_H_8B = Setup("cuda", nheads=128, headdim=64, dstate=128, ngroups=8, chunk_size=128,
                      decode_batches=tuple(2 ** i for i in range(9)), prefill_batch=4, prefill_len=8192,
                      kv_heads=8, query_heads=32, attention_dim=128, attention_batches=(1, 8, 64),
                      contexts=(1024, 8192), copy_bytes=2 ** 30, flush_bytes=2 ** 28, warmup=10, iters=100)
CPU_SMOKE = Setup("cpu", nheads=4, headdim=16, dstate=16, ngroups=2, chunk_size=16, decode_batches=(1, 2, 4),
                  prefill_batch=2, prefill_len=40, kv_heads=2, query_heads=4, attention_dim=16,
                  attention_batches=(1, 3), contexts=(20,), copy_bytes=2 ** 22, flush_bytes=2 ** 13, warmup=1,
                  iters=2)


def median_seconds(fn: Callable[[], object], setup: Setup) -> float:
    """Median time of ``fn`` after warmup: CUDA events on a GPU, the wall clock on CPU."""
    flush = torch.empty(setup.flush_bytes, dtype=torch.uint8, device=setup.device)
    for _ in range(setup.warmup):
        fn()
    times = []
    for _ in range(setup.iters):
        flush.zero_()
        if setup.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def queued_seconds(fn: Callable[[], object], setup: Setup) -> float:
    """Time per call of ``setup.iters`` calls issued back to back, as the layers of a model's forward are: the
    host's launch work then hides behind the device's work of the call before."""
    fn()
    if setup.device == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(setup.iters):
        fn()
    if setup.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - begin) / setup.iters


def graphed_seconds(calls: list[Callable[[], object]], setup: Setup) -> float:
    """Time per call of ``calls`` run in turn with nothing between them, ``setup.iters`` times over: on a GPU
    replayed from one CUDA graph, as the engine's decode steps are, so that no launch gap or host work
    counts (on CPU, the plain loop)."""
    if setup.device != "cuda":
        for call in calls:
            call()
        begin = time.perf_counter()
        for _ in range(setup.iters):
            for call in calls:
                call()
        return (time.perf_counter() - begin) / (setup.iters * len(calls))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up outside the recording, as rollout/graphs.py does
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(setup.iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (setup.iters * len(calls))


def peak_bandwidth(setup: Setup) -> float:
    """Bytes per second of a device-to-device copy (read plus write) too large for any cache."""
    src = torch.empty(setup.copy_bytes, dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    return 2 * setup.copy_bytes / median_seconds(lambda: dst.copy_(src), setup)


def model_params(setup: Setup) -> dict[str, torch.Tensor]:
    """A, D, dt_bias as a trained Mamba-2 layer has them, in fp32: A = -exp(A_log), dt_bias = softplus⁻¹(dt)."""
    h = setup.nheads
    return dict(A=-torch.empty(h, device=setup.device).uniform_(1, 16), D=torch.ones(h, device=setup.device),
                dt_bias=torch.expm1(torch.empty(h, device=setup.device).uniform_(1e-3, 0.1)).log())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference over the largest reference value: one bf16 ulp (< 8e-3) on bf16 outputs, ~1e-6 on fp32."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns, so the smoke test (and a reader) can split rows on whitespace."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows])


@contextlib.contextmanager
def launched_as(module: types.ModuleType, name: str, launch: object) -> Iterator[None]:
    """Inside the block, ``module``'s kernels launched as ``launch``: the launch dataclass its launcher reads
    from ``module.<name>`` (``state_update.STEP_LAUNCH``, ``attention.ATTENTION_LAUNCH``)."""
    saved = getattr(module, name)
    setattr(module, name, launch)
    try:
        yield
    finally:
        setattr(module, name, saved)


def graphed_percent(calls: list[Callable[[], object]], moved: int, peak: float, setup: Setup) -> str:
    """% of peak bandwidth of ``calls`` back to back (``graphed_seconds``), or "-" where that fails (a graph
    that does not record, a launch option this Triton lacks): the row's other columns stand without it."""
    try:
        return f"{100 * moved / graphed_seconds(calls, setup) / peak:.1f}"
    except Exception:  # noqa: BLE001 - printed, and the cell says so
        traceback.print_exc()
        return "-"


def decode_rows(setup: Setup, peak: float) -> list[list[str]]:
    """One row per batch size: batch, time_us, MB, GB/s, %peak, graphed_%peak, graphed_pdl_%peak,
    copy_graphed_%peak, rel_err. A fresh state per batch, so the larger ones do not fit in L2; row i in slot
    i, as the engine runs the step (its running sequences hold the first slots). graphed_%peak: steps back to
    back in a CUDA graph, each on its own copy of the state, with enough copies (twice the L2-flush size)
    that none is read from L2. graphed_pdl_%peak: the same as programmatic dependent launches, each step
    reading its state while the one before finishes (``StepLaunch.pdl``; "-" below sm_90).
    copy_graphed_%peak: a device-to-device copy of each of those states into a buffer of its own, back to
    back in a CUDA graph: what a kernel that reads and writes a state's bytes per launch reaches at that
    size, the launches' fixed cost included."""
    h, p, n, g = setup.nheads, setup.headdim, setup.dstate, setup.ngroups
    bf16 = dict(device=setup.device, dtype=torch.bfloat16)
    params = model_params(setup)
    rows = []
    for batch in setup.decode_batches:
        state = torch.randn(batch, h, p, n, device=setup.device)
        x, dt = torch.randn(batch, h, p, **bf16), torch.randn(batch, h, **bf16)
        B, C = torch.randn(batch, g, n, **bf16), torch.randn(batch, g, n, **bf16)
        args = (x, dt, params["A"], B, C, params["D"], params["dt_bias"])

        def step(op: Callable[..., torch.Tensor], state: torch.Tensor) -> torch.Tensor:
            return op(state, *args, slot_idx=None)

        got, want = state.clone(), state.clone()
        err = max(rel_err(step(selective_state_update_triton, got), step(selective_state_update_ref, want)),
                  rel_err(got, want))
        seconds = median_seconds(lambda: step(selective_state_update_triton, state), setup)
        moved = 2 * state.nbytes + x.nbytes + sum(t.nbytes for t in args)   # y is shaped as x
        states = [state, *(torch.randn_like(state) for _ in range(max(1, -(-2 * setup.flush_bytes // state.nbytes))))]
        calls = [partial(step, selective_state_update_triton, s) for s in states]
        graphed, dependent = graphed_percent(calls, moved, peak, setup), "-"
        if state_update.dependent_launch_supported(state.device):
            with launched_as(state_update, "STEP_LAUNCH", dataclasses.replace(state_update.STEP_LAUNCH, pdl=True)):
                dependent = graphed_percent(calls, moved, peak, setup)
        copies = [partial(torch.Tensor.copy_, torch.empty_like(s), s) for s in states]
        copied = graphed_percent(copies, 2 * state.nbytes, peak, setup)
        rows.append([str(batch), f"{seconds * 1e6:.1f}", f"{moved / 1e6:.2f}", f"{moved / seconds / 1e9:.1f}",
                     f"{100 * moved / seconds / peak:.1f}", graphed, dependent, copied, f"{err:.1e}"])
    return rows


def decode(setup: Setup, peak: float) -> str:
    title = (f"decode: selective_state_update, nheads {setup.nheads}, headdim {setup.headdim}, dstate "
             f"{setup.dstate}, ngroups {setup.ngroups}, fp32 state, bf16 x/dt/B/C, row i in slot i")
    return table(title, ["batch", "time_us", "MB", "GB/s", "%peak", "graphed_%peak", "graphed_pdl_%peak",
                         "copy_graphed_%peak", "rel_err"], decode_rows(setup, peak))


def attention_rows(setup: Setup, peak: float) -> list[list[str]]:
    """One row per (batch, context): the decode attention over bf16 caches holding exactly the context, every
    row at its last position, no write: batch, context, MB (keys and values, read once), time_us and %peak of
    ``decode_attention_triton``, time_us of its reference (batched cuBLAS products and a softmax, what the
    engine ran before the kernel), the reference's time over the kernel's, rel_err."""
    rows = []
    for batch, context in product(setup.attention_batches, setup.contexts):
        bf16 = dict(device=setup.device, dtype=torch.bfloat16)
        shape = (batch, setup.kv_heads, context, setup.attention_dim)
        keys, values = torch.randn(shape, **bf16), torch.randn(shape, **bf16)
        q = torch.randn(batch, setup.query_heads, setup.attention_dim, **bf16)
        positions = torch.full((batch,), context - 1, device=setup.device)
        ours, ref = (partial(op, q, keys, values, positions, setup.attention_dim ** -0.5)
                     for op in (decode_attention_triton, decode_attention_ref))
        err = rel_err(ours(), ref())
        seconds, ref_seconds = median_seconds(ours, setup), median_seconds(ref, setup)
        moved = keys.nbytes + values.nbytes
        rows.append([str(batch), str(context), f"{moved / 1e6:.2f}", f"{seconds * 1e6:.1f}",
                     f"{100 * moved / seconds / peak:.1f}", f"{ref_seconds * 1e6:.1f}", f"{ref_seconds / seconds:.2f}",
                     f"{err:.1e}"])
    return rows


def attention(setup: Setup, peak: float) -> str:
    title = (f"decode attention: {setup.query_heads} query heads on {setup.kv_heads} KV heads of "
             f"{setup.attention_dim}, bf16; speed = the reference's time / the kernel's")
    return table(title, ["batch", "context", "MB", "time_us", "%peak", "ref_us", "speed", "rel_err"],
                 attention_rows(setup, peak))


def tune_attention(setup: Setup, peak: float, launches: list) -> str:
    """% of peak bandwidth of the decode attention per launch variant (rows) and (batch, context) (columns)."""
    rows = []
    for launch in launches:
        with launched_as(attention_module, "ATTENTION_LAUNCH", launch):
            result = attention_rows(setup, peak)
        rows.append([differences(launch), *(r[4] for r in result), f"{max(float(r[-1]) for r in result):.1e}"])
    columns = [f"{b}x{c}" for b, c in product(setup.attention_batches, setup.contexts)]
    return table("decode attention: % of peak bandwidth per launch variant and batch x context "
                 "(rel_err: the largest of the row)", ["variant", *columns, "rel_err"], rows)


def import_skipping_package_init(package: str, module: str) -> types.ModuleType:
    """``module`` of ``package`` without running ``package/__init__.py``: the package is registered as a bare
    module over its own directory, so only ``module`` and what it imports load.

    mamba_ssm needs this: its ``__init__`` imports the CUDA extension ``selective_scan_cuda``, which an
    install with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` does not have, while its Triton SSD kernels need no extension."""
    if package not in sys.modules:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError(f"no package {package!r}")
        bare = types.ModuleType(package)
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = bare
    return importlib.import_module(module)


def mamba_chunk_scan() -> tuple[Callable[..., object] | None, str]:
    """mamba_ssm's fused SSD, or None and why not."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return None, f"mamba_ssm not installed: skipped ({MAMBA_INSTALL})"
    if not torch.cuda.is_available():
        return None, "mamba_ssm: skipped (needs CUDA)"
    return import_skipping_package_init("mamba_ssm", "mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined, ""


def prefill_calls(setup: Setup, baseline: bool = True) -> tuple[dict, dict[str, Callable[[], object]], str]:
    """Random bf16 prefill inputs at the setup's shapes, and the scans to run on them: ssd_scan, then
    (``baseline``) mamba_ssm's fused SSD when it is installed, else why not."""
    b, length, h, p, n, g = (setup.prefill_batch, setup.prefill_len, setup.nheads, setup.headdim, setup.dstate,
                             setup.ngroups)
    bf16 = dict(device=setup.device, dtype=torch.bfloat16)
    args = dict(x=torch.randn(b, length, h, p, **bf16), dt=torch.randn(b, length, h, **bf16),
                B=torch.randn(b, length, g, n, **bf16), C=torch.randn(b, length, g, n, **bf16), **model_params(setup))
    calls = {"ssd_scan": lambda: ssd_scan_triton(**args, chunk_size=setup.chunk_size)}
    theirs, why_not = mamba_chunk_scan() if baseline else (None, "")
    if theirs is not None:
        calls["mamba_chunk_scan_combined"] = lambda: theirs(chunk_size=setup.chunk_size, dt_softplus=True,
                                                            return_final_states=True, **args)
    return args, calls, why_not


def prefill(setup: Setup, baseline: bool = True) -> str:
    """ssd_scan, then (``baseline``) mamba_ssm's fused SSD on the same inputs when it is installed."""
    args, calls, why_not = prefill_calls(setup, baseline)
    want_y, want_final = ssd_scan_ref(**args, chunk_size=setup.chunk_size)
    tokens = setup.prefill_batch * setup.prefill_len
    rows, base = [], None
    for name, fn in calls.items():
        y, final = fn()
        err = max(rel_err(y, want_y), rel_err(final, want_final))
        seconds = median_seconds(fn, setup)
        base = base or seconds
        rows.append([name, f"{seconds * 1e3:.3f}", f"{tokens / seconds / 1e6:.2f}", f"{seconds / base:.2f}",
                     f"{queued_seconds(fn, setup) * 1e3:.3f}", f"{err:.1e}"])
    title = (f"prefill: batch {setup.prefill_batch} x {setup.prefill_len} tokens, chunk {setup.chunk_size}, "
             "bf16 x/dt/B/C; time_ratio = time / ssd_scan's time; queued_ms: per call, issued back to back")
    out = table(title, ["impl", "time_ms", "Mtok/s", "time_ratio", "queued_ms", "rel_err"], rows)
    return f"{out}\n{why_not}" if why_not else out


# Prefill kernels by name, ours and mamba_ssm's, as columns of the tuning table.
KERNEL_COLUMNS = {"cumsum": ("_chunk_cumsum",), "state": ("_chunk_state",), "passing": ("_state_passing",),
                  "cb": ("_chunk_cb", "_bmm_chunk"), "scan": ("_chunk_scan",)}


def kernel_ms(call: Callable[[], object], calls: int = 10) -> dict[str, float]:
    """Device milliseconds per call spent in each prefill kernel, from torch.profiler (CUDA only)."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    out = dict.fromkeys(KERNEL_COLUMNS, 0.0)
    for event in prof.key_averages():
        for column, names in KERNEL_COLUMNS.items():
            if event.key.startswith(names):
                out[column] += event.device_time_total / calls / 1e3
    return out


def differences(launch: object) -> str:
    """The fields of a launch dataclass that differ from its defaults, as one word (``default`` for none)."""
    default = type(launch)()
    changed = [f"{f.name}={getattr(launch, f.name)}" for f in fields(launch)
               if getattr(launch, f.name) != getattr(default, f.name)]
    return ",".join(changed) or "default"


def tune_decode(setup: Setup, peak: float, launches: list) -> str:
    """% of peak bandwidth of the decode step per launch variant (rows) and batch size (columns), each cell
    the step timed alone and back to back in a CUDA graph (``decode_rows``' %peak/graphed_%peak)."""
    rows = []
    for launch in launches:
        with launched_as(state_update, "STEP_LAUNCH", launch):
            result = decode_rows(setup, peak)
        rows.append([differences(launch), *(f"{r[4]}/{r[5]}" for r in result),
                     f"{max(float(r[-1]) for r in result):.1e}"])
    return table("decode: % of peak bandwidth per launch variant and batch, alone/graphed "
                 "(rel_err: the largest of the row)", ["variant", *map(str, setup.decode_batches), "rel_err"], rows)


def tune_prefill(setup: Setup, launches: list) -> str:
    """The prefill scan per launch variant: time, its ratio to mamba_ssm's (when installed), and the time of
    each kernel (on a GPU; the interpreter's kernels are Python calls), beside mamba_ssm's kernels."""
    module = importlib.import_module("rollout.kernels.ssd_scan")
    args, calls, why_not = prefill_calls(setup)
    want_y, want_final = ssd_scan_ref(**args, chunk_size=setup.chunk_size)
    gpu = setup.device == "cuda"
    theirs = calls.get("mamba_chunk_scan_combined")
    base = median_seconds(theirs, setup) if theirs else None

    def row(name: str, call: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
        y, final = call()
        err = max(rel_err(y, want_y), rel_err(final, want_final))
        seconds = base if call is theirs else median_seconds(call, setup)
        per_kernel = kernel_ms(call) if gpu else {}
        return [name, f"{seconds * 1e3:.3f}", f"{base / seconds:.2f}" if base else "-",
                *(f"{per_kernel[k]:.3f}" if gpu else "-" for k in KERNEL_COLUMNS), f"{err:.1e}"]

    rows = [row("mamba_chunk_scan_combined", theirs)] if theirs else []
    for launch in launches:
        module.LAUNCH = launch
        rows.append(row(differences(launch), calls["ssd_scan"]))
    module.LAUNCH = module.ScanLaunch()
    title = (f"prefill: batch {setup.prefill_batch} x {setup.prefill_len} tokens, ms per call, per kernel; "
             "speed = mamba_ssm's time / this time")
    out = table(title, ["variant", "time_ms", "speed", *KERNEL_COLUMNS, "rel_err"], rows)
    return f"{out}\n{why_not}" if why_not else out


def tune(setup: Setup, peak: float) -> None:
    """The decode step, the prefill scan and the decode attention under each launch variant. On CPU
    (``--cpu-smoke``) only two variants of each kernel run: the interpreter is slow, and two show the code
    path."""
    Step, Scan = state_update.StepLaunch, importlib.import_module("rollout.kernels.ssd_scan").ScanLaunch
    steps = [Step(), *(Step(block_p, num_warps, pdl=True) for block_p, num_warps in    # on sm_90 and up
                       ((None, None), (8, 4), (16, 4), (16, 2), (64, 4))),
             *(Step(block_p, num_warps) for block_p, num_warps in     # (4, 4): mamba_ssm's at dstate 128
               ((4, 4), (8, 2), (8, 4), (16, 4), (16, 8), (32, 8), (64, 2), (64, 4)))]
    grid = [Scan(scan_block_k=k, state_warps=w, scan_warps=w, low_precision=low, precompute_cb=cb)
            for cb, low, k, w in product((False, True), (False, True), (16, 32, 64), (4, 8))]
    scans = grid + [Scan(**change) for change in (
        dict(state_block_n=128), dict(state_block_k=16), dict(state_block_k=64), dict(state_stages=2),
        dict(state_stages=4), *(dict(scan_stages=n) for n in (1, 3, 4)),
        *(dict(passing_block=b) for b in (256, 1024, 2048)),
        *(dict(passing_warps=w) for w in (1, 2, 8)), dict(scan_block_m=128), dict(scan_block_m=32),
        dict(precompute_cb=True, scan_block_m=128), dict(precompute_cb=True, scan_block_m=32))]
    Attention = attention_module.AttentionLaunch
    attentions = [Attention(), *(Attention(splits=n) for n in (1, 2, 4, 8, 16, 32, 64)),
                  *(Attention(block_n=n, num_warps=w) for n, w in ((32, 4), (32, 8), (128, 8)))]
    if setup.device != "cuda":      # grid[-1] computes C·Bᵀ in its own kernel
        steps, scans, attentions = [steps[0], steps[-1]], [grid[0], grid[-1]], [attentions[0], attentions[3]]
    print(tune_decode(setup, peak, steps), end="\n\n", flush=True)
    print(tune_prefill(setup, scans), end="\n\n", flush=True)
    print(tune_attention(setup, peak, attentions), flush=True)


def header(setup: Setup) -> str:
    if setup.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}), Triton interpreter, tiny shapes"
    return (f"# rollout kernels | device: {device} | {datetime.now():%Y-%m-%d %H:%M} | torch {torch.__version__}, "
            f"triton {triton.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every code path at tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--tune", action="store_true",
                        help="time the kernels under each launch variant, the prefill scan per kernel")
    parser.add_argument("--mamba-src", metavar="DIR",
                        help="import the mamba_ssm baseline from this source tree (an unpacked sdist or a clone)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --cpu-smoke to check the code paths on CPU")
    if args.mamba_src:
        sys.path.insert(0, os.path.abspath(args.mamba_src))
    setup = CPU_SMOKE if args.cpu_smoke else NEMOTRON_H_8B
    torch.manual_seed(0)
    print(header(setup))
    peak = peak_bandwidth(setup)
    print(f"peak bandwidth, device-to-device copy of {setup.copy_bytes / 2 ** 20:g} MiB: {peak / 1e9:.1f} GB/s\n")
    if args.tune:
        tune(setup, peak)
        return
    failed = False
    # a failing part leaves the others their run
    for part in (lambda: decode(setup, peak), lambda: prefill(setup), lambda: attention(setup, peak)):
        try:
            print(part(), end="\n\n", flush=True)
        except Exception:
            traceback.print_exc()
            failed = True
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
