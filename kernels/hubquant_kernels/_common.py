"""What the kernels share: argument checks, the split-K workspace, and a per-shape chooser.

The chooser times a few candidate implementations (Triton configs, cuBLAS-backed torch ops) the
first time a shape bucket is seen on a GPU and keeps the fastest, also on disk (per GPU model, torch/Triton
version and kernel source; HUBQUANT_TUNE_CACHE names the file or turns it off with 0), so later processes
skip the timing; on CPU (TRITON_INTERPRET=1 or the torch references) it takes the first candidate. Set
HUBQUANT_TUNE=0 to skip timing on GPU.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hubquant.errors import UnsupportedError, UsageError, missing_dependency


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under TRITON_INTERPRET=1."""
    return triton_available() and (x.is_cuda or interpreting())


def require_triton() -> None:
    if not triton_available():
        raise missing_dependency("triton", "kernels", why="hubquant's GPU kernels are written in Triton")


def check(cond: bool, message: str, hint: str) -> None:
    """Raise UsageError(message, hint=hint) unless cond."""
    if not cond:
        raise UsageError(message, hint=hint)


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise UnsupportedError(f"{name} has dtype {t.dtype}; this kernel takes {names}",
                               hint=f"convert {name} with .to(...) to one of: {names}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise UsageError(f"tensors are on different devices: {devs}", hint="move them to one device with .to(device)")


def as_2d(x: torch.Tensor, k: int, what: str = "x") -> torch.Tensor:
    """Flatten leading dims to [M, K]; the last dim must be K and have unit stride."""
    check(x.shape[-1] == k, f"{what} has {x.shape[-1]} features, the weight expects {k}",
          hint="pass activations whose last dimension is the layer's input size")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


# ---- split-K workspace: fp32 partial sums + arrival counters, left zeroed by every kernel ----
_WORKSPACES: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def workspace(device: torch.device, n_floats: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed fp32 buffer and int32 counters that split-K kernels reduce into (and re-zero)."""
    key = (device.type, device.index)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < n_floats or cnt.numel() < n_counters:
        if ws is not None:  # CUDA graphs captured earlier still point at the old buffers: never free them
            _RETIRED.append((ws, cnt))
        n_floats = max(n_floats, ws.numel() if ws is not None else 0, 1 << 16)
        n_counters = max(n_counters, cnt.numel() if cnt is not None else 0, 1 << 12)
        ws = torch.zeros(n_floats, dtype=torch.float32, device=device)
        cnt = torch.zeros(n_counters, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


# ---- kernel launches: Triton's launcher called directly once a specialization is compiled ----
_LAUNCHES: dict[tuple, tuple] = {}
# a stack of lists: while hubquant_kernels.bound records a call, every launch appends (compiled, constexpr tail,
# grid, runtime args), or None when the launch went through Triton's own path (nothing a plan could replay)
RECORDING: list[list] = []
_FAST_BROKEN: list[str] = []  # set when this Triton's launcher rejected a direct call: Triton's path from then on


def _no_hook(hook) -> bool:
    """A launch hook that does nothing: None, or an empty HookChain (newer Triton)."""
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


@functools.lru_cache(maxsize=1)
def _knobs():
    try:
        from triton import knobs
    except ImportError:  # older Triton: no knobs module, launcher signature unknown
        return None
    return knobs


def _fast_launch_enabled() -> bool:
    if _FAST_BROKEN or os.environ.get("HUBQUANT_FAST_LAUNCH", "1") == "0" or interpreting():
        return False
    knobs = _knobs()
    return knobs is not None and _no_hook(knobs.runtime.launch_enter_hook) and _no_hook(knobs.runtime.launch_exit_hook)


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, minus most of Triton's per-call Python work.

    Triton's JIT entry binds every argument, formats a specialization key and looks the compiled kernel up on
    each call (tens of microseconds for our ~20-argument kernels). Here the first call of a specialization goes
    through Triton; later calls with the same specialization (argument dtypes, 16-byte alignment of pointers,
    integers equal to 1 or divisible by 16, as Triton specializes them; the same constexprs and launch options)
    call the compiled kernel's launcher directly with the current stream. Positional arguments are the runtime
    ones, keyword arguments the constexprs and launch options. HUBQUANT_FAST_LAUNCH=0 turns this off; it is
    off under the interpreter and while a Triton launch hook (profiler) is set.
    """
    if not _fast_launch_enabled():
        if RECORDING:  # nothing a plan could replay
            RECORDING[-1].append(None)
        return kernel[grid](*args, **kwargs)
    sig = [kernel]
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((a.dtype, a.data_ptr() & 15 == 0))
        elif type(a) is int:
            sig.append((a == 1, a & 15 == 0, -2147483648 <= a <= 2147483647))
        else:
            sig.append(a)
    sig.append(tuple(kwargs.items()))
    key = tuple(sig)
    hit = _LAUNCHES.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        # only when every positional argument is a runtime one (a constexpr's value is not in the key)
        if not any(p.is_constexpr for p in kernel.params[:len(args)]):
            tail = tuple(kwargs[name] for name in kernel.arg_names[len(args):])  # constexprs, in parameter order
            hit = _LAUNCHES[key] = (compiled, tail)
        if RECORDING:
            RECORDING[-1].append(None if hit is None else (hit[0], hit[1], tuple(grid), args))
        return compiled
    compiled, tail = hit
    g = tuple(grid) + (1,) * (3 - len(grid))
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    try:
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)
    except TypeError as e:  # the launcher's arguments differ in this Triton version (checked before launching)
        _FAST_BROKEN.append(repr(e))
        if RECORDING:
            RECORDING[-1].append(None)
        return kernel[grid](*args, **kwargs)
    if RECORDING:
        RECORDING[-1].append((compiled, tail, g, args))
    return compiled


# ---- per-shape chooser ----
@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One way to compute an op: a name for the records and a callable taking the op's arguments."""

    name: str
    fn: Callable
    pure: bool = True  # its work is only Triton launches through `launch` (a bound plan may replay them)


_CHOICES: dict[tuple, Candidate] = {}
TUNE_LOG: dict[tuple, dict[str, float]] = {}


def m_bucket(m: int) -> int:
    """Shapes are tuned per power-of-two bucket of the token count."""
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


# ---- choices remembered across processes: one JSON file per user, keyed by GPU, software and kernel source ----
_DISK: dict[str, str] | None = None


def tune_cache_path() -> Path | None:
    """$HUBQUANT_TUNE_CACHE (a file; "0" turns the cache off), else ~/.cache/hubquant/kernel-choices.json."""
    env = os.environ.get("HUBQUANT_TUNE_CACHE")
    if env in ("0", "off", ""):
        return None
    return Path(env) if env else Path.home() / ".cache" / "hubquant" / "kernel-choices.json"


@functools.cache
def _software_tag() -> str:
    """torch / Triton versions and a hash of this package's source: new kernels invalidate old choices."""
    import triton

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return f"torch {torch.__version__}|triton {triton.__version__}|src {h.hexdigest()[:12]}"


def _disk_key(device_name: str, key: tuple) -> str:
    return f"{device_name}|{_software_tag()}|{key!r}"


def _load_disk() -> dict[str, str]:
    global _DISK
    if _DISK is None:
        _DISK = {}
        path = tune_cache_path()
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                _DISK = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
            except (OSError, ValueError):  # unreadable or corrupt: tune again and rewrite it
                _DISK = {}
    return _DISK


def cached_choice(device_name: str, key: tuple, candidates: Sequence[Candidate]) -> Candidate | None:
    """The candidate an earlier process chose for this GPU, software and key, if it is still offered."""
    name = _load_disk().get(_disk_key(device_name, key))
    return next((c for c in candidates if c.name == name), None)


def remember_choice(device_name: str, key: tuple, name: str) -> None:
    """Record a choice on disk (atomically: a temporary file renamed over the old one)."""
    disk = _load_disk()
    disk[_disk_key(device_name, key)] = name
    path = tune_cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(disk, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice still holds for this process
        pass


_FLUSH: dict[tuple[str, int | None], torch.Tensor] = {}


def _graph_ms(fn: Callable[[], object], flush: torch.Tensor, reps: int) -> float:
    """GPU ms of `reps` x (L2 flush + fn) replayed as one CUDA graph (median of 5 replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        for _ in range(reps):
            flush.zero_()
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[2]


def graph_bench(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    """GPU ms per call of fn with a cold L2 (a 128 MiB write before each call, its own time subtracted), replayed
    in a CUDA graph: no host launch overhead, which eager timing (do_bench) counts whenever the host is slower than
    the kernels, as it is for two ~10 µs launches issued from Python. For ops that run in CUDA graphs (decoding)."""
    key = (device.type, device.index)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(32 << 20, dtype=torch.int32, device=device)
    flush = _FLUSH[key]
    return max(0.0, (_graph_ms(fn, flush, reps) - _graph_ms(lambda: None, flush, reps)) / reps)


def choose_lazy(key: tuple, make_candidates: Callable[[], Sequence[Candidate]], args: tuple,
                on_gpu: bool, *, graph: bool = False) -> Candidate:
    """`choose`, but the candidates are built only the first time `key` is seen on the GPU.

    The hot path of an eager call is one dict lookup: the entry points call this after their argument checks, so
    a decided shape costs no candidate construction (40-50 closures for W4A16 at M=1) and no chooser logic.
    """
    if on_gpu:
        hit = _CHOICES.get(key)
        if hit is not None:
            return hit
    return choose(key, make_candidates(), args, on_gpu, graph=graph)


def choose(key: tuple, candidates: Sequence[Candidate], args: tuple, on_gpu: bool, *,
           graph: bool = False) -> Candidate:
    """The fastest candidate for `key` (timed once per GPU model and kernel source, remembered on disk); the
    first one off the GPU. graph: time CUDA-graph replays (`graph_bench`) instead of eager calls; ties go to the
    earlier candidate."""
    if not on_gpu:
        return candidates[0]
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    if os.environ.get("HUBQUANT_TUNE", "1") == "0" or len(candidates) == 1:
        _CHOICES[key] = candidates[0]  # nothing to time: decided once, like a timed choice
        return candidates[0]
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    device_name = torch.cuda.get_device_name(device)
    hit = cached_choice(device_name, key, candidates)
    if hit is not None:
        _CHOICES[key] = hit
        return hit
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton import testing

    times = {}
    for c in candidates:
        try:
            c.fn(*args)  # compile, and allocate workspaces outside any graph capture
            torch.cuda.synchronize()
            # do_bench flushes L2 before every timed call: weights arrive cold, as in decoding, where each
            # layer's weights are read once per token (timing L2-resident weights favoured too little parallelism)
            if graph:
                times[c.name] = graph_bench(lambda c=c: c.fn(*args), device)
            else:
                times[c.name] = testing.do_bench(lambda c=c: c.fn(*args), warmup=3, rep=12, return_mode="median")
        except Exception as e:  # noqa: BLE001  (a config that does not compile for this shape (e.g. out of shared memory)
            if os.environ.get("HUBQUANT_DEBUG") == "1":
                print(f"[hubquant_kernels] {c.name} failed for {key}: {type(e).__name__}: {e}")
            times[c.name] = float("inf")
    best = min(candidates, key=lambda c: times[c.name])
    _CHOICES[key] = best
    TUNE_LOG[key] = times
    remember_choice(device_name, key, best.name)
    return best


def chosen() -> dict[tuple, str]:
    """What the chooser picked so far, per key (for benchmark reports)."""
    return {k: c.name for k, c in _CHOICES.items()}
