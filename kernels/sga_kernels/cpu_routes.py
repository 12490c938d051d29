"""The CPU route of the fused linear loss's float32 chunk GEMMs, measured once per machine and cached on disk.

Which library runs each chunk GEMM fastest depends on the CPU (docs/kernel-notes.md, fused linear "v6"): on an AMD
EPYC (Zen 5) oneDNN ran every chunk GEMM 1.6-2x faster than ``torch.mm`` (MKL's sgemm), on an Intel Xeon with AMX
the two were within 6% on the full product, and on an AMD EPYC (Zen 3) oneDNN won the Z GEMM and lost dH and the
float32 accumulator's update by 15-35%. A fixed choice tuned on one CPU loses on another, so the route (a
``linear_gemms.GemmRoute``: the library of Z, of dH and of the dW update) is chosen by a short probe:

- **What is timed.** Each chunk GEMM through the very functions the loop calls (``linear_gemms.logits_into``,
  ``hidden_grad``, ``accumulate_weight_grad``), on each library, at the call's chunk rows R and hidden size D and
  a vocabulary slice of ``probe_vocab`` rows (about ``PROBE_FLOPS`` per GEMM: ~25-35 ms at one thread on the
  CPUs measured) of an [R, V] buffer (the chunk workspace's own size and row stride), with the caller's thread
  count: at one thread the thread's CPU time, else wall clock (:func:`probe_clock`). A first call of each
  library, then ``PROBE_ROUNDS`` rounds with the libraries alternating; the minimum counts. A library whose first
  call took over ``SLOW_FIRST_CALL`` times the other's is not called again, and the rounds stop at
  ``PROBE_SECONDS`` in all: about 0.7-1.5 s at one thread. Its memory: the [R, V] buffer (the size of the call's
  own workspace) and two slices of about 32 MiB, freed when it returns.
- **The decision rule** (:func:`decide`), per GEMM: oneDNN only when its time is at most ``1 - MARGIN`` (0.95) of
  torch.mm's. torch.mm is the default because it is the simpler route: one call straight into the workspace or the
  accumulator (``addmm_``), no block products (each a fresh allocation) and one parallel region instead of one or
  two per block (each waits for a busy core on a shared machine). So where oneDNN buys nothing (the Xeon: 0.53 s
  against torch.mm's 0.50 s for the [1024, 512] x [512, 65536] product) the route is torch.mm everywhere.
- **What it does not choose.** The chunk rows R: the budget rule of ``linear.default_chunk_rows`` already takes the
  most rows the caller's ``chunk_budget_bytes`` allows (the default budget: 1/16 of the kept rows' logits, at least
  128 rows), and more rows per chunk were never slower per row on the CPUs measured, so there is nothing for a
  probe to choose inside the budget, and nothing outside it may be chosen. The block size of oneDNN products: 1-16
  MiB measured within noise on both AMD CPUs; 4 MiB keeps the peak memory steady (docs/kernel-notes.md, "v5").
- **When.** Only for float32 CPU GEMMs of at least ``linear_gemms.ONEDNN_MIN_FLOPS`` (smaller ones, other dtypes
  and other devices always call torch.mm, and never probe), the first time a process meets a key that the cache
  file does not hold. The key: the CPU (:func:`cpu_description`: model name, family, model, stepping, SIMD
  flags), the torch version, the dtype, the thread count, the GEMM shape (D, R, V) and ``PROBE_VERSION``. A
  benchmark settles the route (``linear.warm_up_cpu_route``, or one loss call) before it times anything, so that
  no probe runs in a timed region (bench/test_bench_linear.py and bench/cpu_check.py do, and check it).
- **The cache.** A JSON file, ``$SGA_CPU_ROUTE_CACHE``, else ``$XDG_CACHE_HOME/sga/cpu-routes.json``, else
  ``~/.cache/sga/cpu-routes.json``: ``{"format": 1, "routes": {key: record}}``, each record holding the route,
  the probe's timings in ms per GEMM and library, its shape, the CPU, torch version, threads, date and the
  probe's own duration. It is written atomically (a temporary file in the same folder, then ``os.replace``),
  merged with what another process wrote meanwhile. A file that cannot be read or parsed is ignored with one
  warning (and replaced at the next write); a file that cannot be written leaves the route in memory only.
- **Forcing a route.** ``SGA_CPU_ROUTE``: ``mm`` (torch.mm everywhere), ``onednn`` (oneDNN everywhere), or per
  GEMM, e.g. ``logits=onednn,hidden_grad=mm,weight_grad=mm``; unset or ``probe``: measured. The older
  ``SGA_ONEDNN_GEMM=0`` still means torch.mm everywhere. Forced routes neither probe nor touch the cache.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from . import linear_gemms
from .linear_gemms import GEMMS, MM_ROUTE, ONEDNN_ROUTE, GemmRoute

ROUTE_ENVIRONMENT = "SGA_CPU_ROUTE"
CACHE_ENVIRONMENT = "SGA_CPU_ROUTE_CACHE"
CACHE_FORMAT = 1
# Part of every key: a change to what the probe measures or how it decides makes older records unused.
PROBE_VERSION = 2
# Flops of one probed GEMM: ~25-35 ms at one thread on the CPUs measured, long enough that the call overheads
# (block allocations, parallel regions) weigh as they do at the loss's own sizes.
PROBE_FLOPS = 1 << 31
PROBE_ROUNDS = 2
# Bounds on the probe's own time: a library whose first call took more than SLOW_FIRST_CALL times the fastest
# library's is not timed again (its first call stands: on a shared machine at 2 threads oneDNN's blocks took 3.4x
# torch.mm's time for dW, 0.8 s a call); rounds after the first stop once a GEMM has had PROBE_SECONDS / 3.
SLOW_FIRST_CALL = 3.0
PROBE_SECONDS = 1.5
# oneDNN must take at most (1 - MARGIN) of torch.mm's time to be chosen: the simpler route wins ties and noise.
MARGIN = 0.05
# SIMD features that decide which GEMM kernels a library runs (the rest of /proc/cpuinfo's flags do not).
SIMD_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "sve", "asimd", "bf16", "i8mm",
)  # fmt: skip

_lock = threading.Lock()
_routes: dict[str, GemmRoute] = {}  # key -> route, for this process
_warned_paths: set[str] = set()
probe_count = 0  # probes run by this process (the benchmarks check it does not move while they time)


def cpu_description() -> str:
    """The CPU as the OS names it: on Linux /proc/cpuinfo's model name, family / model / stepping and the SIMD
    flags among SIMD_FLAGS, e.g. "AMD EPYC (family 25 model 1 stepping 1; avx avx2 f16c fma)"; elsewhere
    platform.processor() and the machine type."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            fields: dict[str, str] = {}
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor's block describes them all
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        fields = {}
    model = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    ids = [f"{label} {fields[name]}" for name, label in
           (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")) if name in fields]  # fmt: skip
    flags = sorted(set((fields.get("flags") or fields.get("Features") or "").split()) & set(SIMD_FLAGS))
    details = "; ".join(part for part in (" ".join(ids), " ".join(flags)) if part)
    return f"{model} ({details})" if details else model


def cache_path() -> Path:
    """Where routes are cached: $SGA_CPU_ROUTE_CACHE, else $XDG_CACHE_HOME/sga/cpu-routes.json, else
    ~/.cache/sga/cpu-routes.json."""
    explicit = os.environ.get(CACHE_ENVIRONMENT)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sga" / "cpu-routes.json"


def forced_route() -> Optional[GemmRoute]:
    """The route the environment forces, or None to measure it: SGA_CPU_ROUTE = "mm" | "onednn" | per-GEMM
    "logits=...,hidden_grad=...,weight_grad=..." (GEMMs left out: mm) | "probe" / unset; SGA_ONEDNN_GEMM=0: mm."""
    value = os.environ.get(ROUTE_ENVIRONMENT, "").strip().lower()
    if not value or value == "probe":
        return MM_ROUTE if os.environ.get("SGA_ONEDNN_GEMM", "1") == "0" else None
    if value in ("mm", "onednn"):
        return MM_ROUTE if value == "mm" else ONEDNN_ROUTE
    choices = {}
    for part in value.split(","):
        gemm, sep, library = (piece.strip() for piece in part.partition("="))
        if not sep or gemm not in GEMMS:
            raise ValueError(
                f"{ROUTE_ENVIRONMENT}={os.environ[ROUTE_ENVIRONMENT]!r}: expected 'mm', 'onednn', 'probe' or "
                f"comma-separated GEMM=LIBRARY with GEMM in {GEMMS} and LIBRARY in {linear_gemms.LIBRARIES}"
            )
        choices[gemm] = library
    try:
        return GemmRoute(**choices)
    except ValueError as error:
        raise ValueError(f"{ROUTE_ENVIRONMENT}={os.environ[ROUTE_ENVIRONMENT]!r}: {error}") from None


def probe_vocab(chunk_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Vocabulary rows of the probe's head slice: about PROBE_FLOPS in each GEMM, at most V."""
    rows = PROBE_FLOPS // (2 * chunk_rows * hidden_size)
    return max(1, min(vocab_size, rows))


def route_key(dtype: torch.dtype, hidden_size: int, vocab_size: int, chunk_rows: int, threads: int) -> str:
    """The cache key: CPU, torch version, dtype, threads, the shape (D, R, V) of the chunk GEMMs and the probe's
    version."""
    dtype_name = str(dtype).replace("torch.", "")
    return (f"{cpu_description()} | torch {torch.__version__} | {dtype_name} | threads {threads} | "
            f"D {hidden_size} R {chunk_rows} V {vocab_size} | probe {PROBE_VERSION}")  # fmt: skip


def decide(timings: dict[str, dict[str, float]], margin: float = MARGIN) -> GemmRoute:
    """The route from the probe's timings {gemm: {"mm": s, "onednn": s}}: per GEMM oneDNN when it takes at most
    (1 - margin) of torch.mm's time, else torch.mm (also when oneDNN was not timed)."""
    choices = {}
    for gemm in GEMMS:
        times = timings.get(gemm, {})
        onednn, mm = times.get("onednn"), times.get("mm")
        faster = onednn is not None and mm is not None and onednn <= (1.0 - margin) * mm
        choices[gemm] = "onednn" if faster else "mm"
    return GemmRoute(**choices)


def _probe_calls(
    chunk_rows: int, hidden_size: int, vocab: int, vocab_size: int
) -> dict[str, Callable[[GemmRoute], None]]:
    """The three chunk GEMMs of one chunk, each a function of the route, on the first `vocab` columns of an
    [R, V] buffer: the GEMMs see the chunk workspace's real row stride (a torch.mm product into rows 256 KB apart
    ran 10-25% slower than into rows of a 16384-column slice on an AMD EPYC), the head and accumulator slices
    have the real layout. Z is written into the buffer and read back as G, as in the loop."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.empty(chunk_rows, hidden_size).uniform_(-1.0, 1.0, generator=generator)
    weight = torch.empty(vocab, hidden_size).uniform_(-1.0, 1.0, generator=generator) / hidden_size
    workspace = torch.empty(chunk_rows, vocab_size)[:, :vocab]
    workspace.uniform_(-1.0, 1.0, generator=generator)
    accumulator = torch.zeros(vocab, hidden_size)
    return {
        "logits": lambda route: linear_gemms.logits_into(workspace, hidden, weight, None, 1.0, route),
        "hidden_grad": lambda route: linear_gemms.hidden_grad(workspace, weight, route),
        "weight_grad": lambda route: linear_gemms.accumulate_weight_grad(accumulator, workspace, hidden, route),
    }


def probe_clock(threads: int) -> Callable[[], float]:
    """The probe's clock: at one thread the calling thread's CPU time (the GEMMs run on it; time another process
    takes the core away is left out, so a probe on a shared machine still measures the kernels), else wall clock
    (the pool's threads, and their waits at each parallel region, are part of the cost)."""
    return time.thread_time if threads == 1 else time.perf_counter


def probe(dtype: torch.dtype, hidden_size: int, vocab_size: int, chunk_rows: int) -> dict:
    """Time each chunk GEMM on each library (see the module docstring); returns the record the cache keeps,
    the route under "route"."""
    global probe_count
    probe_count += 1
    begin = time.perf_counter()
    threads = torch.get_num_threads()
    vocab = probe_vocab(chunk_rows, hidden_size, vocab_size)
    libraries = ("mm", "onednn") if linear_gemms.onednn_works() else ("mm",)
    clock = probe_clock(threads)
    calls = _probe_calls(chunk_rows, hidden_size, vocab, vocab_size)
    routes = {library: GemmRoute(library, library, library) for library in libraries}
    timings: dict[str, dict[str, float]] = {}

    def timed(call: Callable[[GemmRoute], None], library: str) -> float:
        start = clock()
        call(routes[library])
        return clock() - start

    with torch.no_grad():
        for gemm, call in calls.items():
            gemm_begin = time.perf_counter()
            # the first call of each library (oneDNN primitive creation, packing buffers) is kept only as the time
            # of a library that is clearly slower, which is then not called again
            timings[gemm] = {library: timed(call, library) for library in libraries}
            fastest = min(timings[gemm].values())
            contenders = [lib for lib in libraries if timings[gemm][lib] <= SLOW_FIRST_CALL * fastest]
            if len(contenders) < 2:
                continue
            timings[gemm] = {library: float("inf") if library in contenders else seconds
                             for library, seconds in timings[gemm].items()}  # fmt: skip
            for round_index in range(PROBE_ROUNDS):
                if round_index > 0 and time.perf_counter() - gemm_begin > PROBE_SECONDS / len(GEMMS):
                    break
                order = contenders if round_index % 2 == 0 else contenders[::-1]
                for library in order:
                    timings[gemm][library] = min(timings[gemm][library], timed(call, library))
    route = decide(timings)
    return {
        "route": {"logits": route.logits, "hidden_grad": route.hidden_grad, "weight_grad": route.weight_grad,
                  "block_bytes": route.block_bytes},  # fmt: skip
        "timings_ms": {gemm: {lib: round(s * 1e3, 3) for lib, s in times.items()} for gemm, times in timings.items()},
        "probe_shape": {"rows": chunk_rows, "hidden_size": hidden_size, "vocab": vocab, "vocab_size": vocab_size},
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "probe_seconds": round(time.perf_counter() - begin, 3),
    }


def _warn_once(path: Path, message: str) -> None:
    if str(path) not in _warned_paths:
        _warned_paths.add(str(path))
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def read_cache(path: Optional[Path] = None) -> dict[str, dict]:
    """The cached records {key: record}; {} when the file is missing, and {} with one warning when it cannot be
    read or is not a cache file of this format."""
    path = path or cache_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as error:
        _warn_once(path, f"sga.kernels: cannot read the CPU route cache {path} ({error}); ignoring it")
        return {}
    try:
        content = json.loads(text)
        routes = content["routes"]
        if content.get("format") != CACHE_FORMAT or not isinstance(routes, dict):
            raise ValueError(f"format {content.get('format')!r}, expected {CACHE_FORMAT}")
        for record in routes.values():
            _route_from_record(record)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        _warn_once(path, f"sga.kernels: the CPU route cache {path} is corrupt ({type(error).__name__}: {error}); "
                         "ignoring it (it is rewritten after the next probe)")  # fmt: skip
        return {}
    return routes


def _route_from_record(record: dict) -> GemmRoute:
    fields = record["route"]
    return GemmRoute(**{name: fields[name] for name in (*GEMMS, "block_bytes")})


def write_record(key: str, record: dict, path: Optional[Path] = None) -> bool:
    """Add one record to the cache file, atomically (a temporary file in the same folder, then os.replace),
    keeping the records another process wrote meanwhile. False (with one warning) when it cannot be written."""
    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        routes = read_cache(path)
        routes[key] = record
        text = json.dumps({"format": CACHE_FORMAT, "routes": routes}, indent=1, sort_keys=True)
        descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as error:
        _warn_once(path, f"sga.kernels: cannot write the CPU route cache {path} ({error}); the measured route is "
                         "kept for this process only")  # fmt: skip
        return False
    return True


def route_for(dtype: torch.dtype, hidden_size: int, vocab_size: int, chunk_rows: int) -> GemmRoute:
    """The route for float32 CPU chunk GEMMs of R = chunk_rows rows, hidden size D and vocabulary V at this
    process's thread count: forced by the environment, else this process's memo, else the cache file, else
    measured now by :func:`probe` (and written to the cache). Other dtypes: torch.mm (``MM_ROUTE``)."""
    forced = forced_route()
    if forced is not None:
        return forced
    if dtype != torch.float32 or 2 * chunk_rows * hidden_size * vocab_size < linear_gemms.ONEDNN_MIN_FLOPS:
        return MM_ROUTE  # no choice to make: torch.mm either way (bf16 / fp16 mm is oneDNN already)
    key = route_key(dtype, hidden_size, vocab_size, chunk_rows, torch.get_num_threads())
    with _lock:
        route = _routes.get(key)
        if route is not None:
            return route
        record = read_cache().get(key)
        if record is None:
            record = probe(dtype, hidden_size, vocab_size, chunk_rows)
            write_record(key, record)
        route = _route_from_record(record)
        _routes[key] = route
    return route


def clear_memo() -> None:
    """Forget this process's routes (the next call reads the cache file again)."""
    with _lock:
        _routes.clear()


def describe_cache() -> dict[str, dict]:
    """This CPU's cached records (key -> route and timings), for a benchmark's header."""
    cpu = cpu_description()
    return {key: {name: record.get(name) for name in ("route", "timings_ms", "probe_seconds", "date")}
            for key, record in read_cache().items() if key.startswith(cpu + " |")}  # fmt: skip
