"""Device profiles: the per-device constants of the cost model, their defaults, and their JSON storage.

A profile says how fast a device multiplies (per dtype), how fast it moves bytes (plain copies and
element-granular transposes), what one kernel launch and one view op cost, how small GEMM dimensions lose
efficiency, and whether its GEMM reads strided operands without a copy (torch: yes; onnxruntime: no, every
Transpose node is a real copy). ``einfx.calibrate`` measures one; profiles are stored as versioned JSON in
the user cache dir (``$EINFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/einfx``, else ``~/.cache/einfx``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

from einfx.errors import ProfileError

__all__ = ["DeviceProfile", "PROFILE_VERSION", "default_profile", "flops_only_profile", "cache_dir",
           "profile_path", "save_profile", "load_profile", "device_key"]

PROFILE_VERSION = 2  # 2: transposed_read
_HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class DeviceProfile:
    """Constants of the cost model for one device (and execution backend).

    Attributes:
        name: a label, e.g. ``"cpu-default"`` or ``"cpu-calibrated"``.
        device: device kind, ``"cpu"`` or ``"cuda"``.
        flops_fp32: sustained GEMM rate in float32 (FLOP/s) at large sizes.
        flops_half: sustained GEMM rate in float16/bfloat16 (FLOP/s).
        gemm_half_dim: a GEMM dimension of this size runs at half efficiency (eff = Π d / (d + h)).
        copy_bandwidth: bytes/s (read + write counted) of a copy whose innermost run stays contiguous.
        transpose_bandwidth: bytes/s of an element-granular copy with strides across pages.
        block_bandwidth: bytes/s of an element-granular copy confined to cache-sized blocks (per token).
        memory_bandwidth: bytes/s for traffic beyond ``cache_bytes`` per primitive (DRAM, fresh pages).
        cache_bytes: bytes per primitive that move at cache speed (copy bandwidth for a GEMM's operands).
        launch_s: fixed cost of one kernel (GEMM, copy).
        view_s: fixed cost of one view op (reshape, permute) in eager execution.
        call_s: fixed cost of one eager call of a structured layer beyond its steps (module call, plan
            lookup, scratch bookkeeping); charged on strided-GEMM (eager torch) backends only.
        threads: CPU intra-op threads the constants hold for (1 for CUDA).
        transposed_read: GEMM time factor when the GEMM reads an activation through a transposed strided view
            (unit stride along the rows of a left operand or the contraction of a right one) instead of in its
            natural row-major layout.
        strided_gemm: whether the GEMM reads an operand through a strided view without copying it.
        version: the file format version (``PROFILE_VERSION``).
    """

    name: str
    device: str
    flops_fp32: float
    flops_half: float
    gemm_half_dim: float
    copy_bandwidth: float
    transpose_bandwidth: float
    block_bandwidth: float
    memory_bandwidth: float
    cache_bytes: float
    launch_s: float
    view_s: float
    transposed_read: float = 1.0
    call_s: float = 0.0
    threads: int = 1
    strided_gemm: bool = True
    version: int = PROFILE_VERSION

    def flops_rate(self, dtype: str) -> float:
        """GEMM rate (FLOP/s) for a dtype name such as ``"float32"``."""
        return self.flops_half if dtype in _HALF else self.flops_fp32

    def with_backend(self, backend: str) -> "DeviceProfile":
        """The same device seen through ``"torch"`` (strided views are free) or ``"onnxruntime"`` (not)."""
        if backend not in ("torch", "onnxruntime"):
            raise ProfileError(f"unknown backend {backend!r}; valid: torch, onnxruntime")
        suffix = "" if backend == "torch" else "+ort"
        base = self.name.removesuffix("+ort")
        return replace(self, strided_gemm=backend == "torch", name=base + suffix)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "DeviceProfile":
        """Validate and build; raise `ProfileError` naming ``source`` on any problem."""
        if not isinstance(data, dict):
            raise ProfileError(f"profile {source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != PROFILE_VERSION:
            raise ProfileError(f"profile {source}: version {version!r} is not supported (this einfx reads "
                               f"version {PROFILE_VERSION}); run einfx.calibrate() again")
        fields = set(cls.__dataclass_fields__)
        missing, unknown = fields - set(data), set(data) - fields
        if missing or unknown:
            raise ProfileError(f"profile {source}: missing fields {sorted(missing)}, unknown fields "
                               f"{sorted(unknown)}; valid fields: {sorted(fields)}")
        for key in fields - {"name", "device", "strided_gemm", "version"}:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or value == float("inf"):
                raise ProfileError(f"profile {source}: field {key!r} must be a finite number >= 0, got {value!r}")
        if data["device"] not in ("cpu", "cuda"):
            raise ProfileError(f"profile {source}: device {data['device']!r} unknown; valid: cpu, cuda")
        return cls(**data)


# Per-thread efficiency of the CPU defaults beyond one thread. Measured on the project's 2-core host with
# einfx.calibrate at 2 threads against 1: GEMM 1.93x, copies 1.75x, per-token transposes 2.0x, DRAM copy
# 1.7x; whole-tensor transposes 1.05x (not scaled).
_THREAD_EFFICIENCY = 0.9


def default_profile(device: str = "cpu", threads: int | None = None) -> DeviceProfile:
    """Built-in constants for ``"cpu"`` (a 2-core AVX2/AVX-512 host) or ``"cuda"`` (an H100/H200-class GPU).

    Args:
        device: ``"cpu"`` or ``"cuda"`` (a device string or torch.device works too).
        threads: CPU intra-op threads the plans will run with (default: ``torch.get_num_threads()``). The
            one-thread rates and bandwidths (but the transpose bandwidth) are scaled by ``1 + 0.9 (threads - 1)``;
            `einfx.calibrate` measures instead.
    """
    kind = device_key(device)
    if kind == "cpu":
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        return _cpu_default(max(1, int(threads)))
    return _CUDA_DEFAULT


@lru_cache(maxsize=64)
def _cpu_default(threads: int) -> DeviceProfile:
    # einfx.calibrate("cpu") on the project's 2-core host with one thread (medians of three runs)
    one = DeviceProfile("cpu-default", "cpu", flops_fp32=8.9e10, flops_half=1.35e9, gemm_half_dim=5.5,
                        copy_bandwidth=2.8e10, transpose_bandwidth=6.4e9, block_bandwidth=1.03e10,
                        memory_bandwidth=1.85e10, cache_bytes=4 * 2**20, launch_s=3.5e-6, view_s=1.2e-6,
                        transposed_read=1.4, call_s=6e-5)
    if threads == 1:
        return one
    k = 1 + _THREAD_EFFICIENCY * (threads - 1)
    # whole-tensor transposes (torch's blocked 2-D transpose copy) measured no faster on 2 threads than on 1
    return replace(one, name=f"cpu-default-{threads}t", threads=threads, flops_fp32=one.flops_fp32 * k,
                   flops_half=one.flops_half * k, copy_bandwidth=one.copy_bandwidth * k,
                   block_bandwidth=one.block_bandwidth * k, memory_bandwidth=one.memory_bandwidth * k)


_CUDA_DEFAULT = DeviceProfile("cuda-default", "cuda", flops_fp32=5e13, flops_half=7e14, gemm_half_dim=128.0,
                              copy_bandwidth=3.5e12, transpose_bandwidth=1.5e12, block_bandwidth=2e12,
                              memory_bandwidth=3.5e12, cache_bytes=50 * 2**20, launch_s=5e-6, view_s=1e-6,
                              transposed_read=1.0, call_s=3e-5)



def flops_only_profile() -> DeviceProfile:
    """A profile where only FLOPs cost time (bytes, launches and small-dimension effects are free)."""
    return DeviceProfile("flops-only", "cpu", flops_fp32=1e12, flops_half=1e12, gemm_half_dim=0.0,
                         copy_bandwidth=1e300, transpose_bandwidth=1e300, block_bandwidth=1e300, memory_bandwidth=1e300,
                         cache_bytes=0.0, launch_s=0.0, view_s=0.0, transposed_read=1.0)


def device_key(device) -> str:
    """``"cpu"`` or ``"cuda"`` for a device, a device string or None (cpu)."""
    text = str(device if device is not None else "cpu")
    kind = text.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ProfileError(f"no cost-model profile for device {text!r}; valid: cpu, cuda")
    return kind


def cache_dir() -> Path:
    """Where profiles live: ``$EINFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/einfx``, else ``~/.cache/einfx``."""
    if os.environ.get("EINFX_CACHE_DIR"):
        return Path(os.environ["EINFX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "einfx"


def profile_path(device="cpu") -> Path:
    return cache_dir() / f"profile-{device_key(device)}-v{PROFILE_VERSION}.json"


def write_json_atomic(target: Path, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``target`` atomically (a temporary file beside it, then a rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=indent, sort_keys=True)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def save_profile(profile: DeviceProfile, path: str | os.PathLike | None = None) -> Path:
    """Write ``profile`` as JSON atomically (temp file + rename); return the path."""
    target = Path(path) if path is not None else profile_path(profile.device)
    write_json_atomic(target, profile.to_dict())
    return target


def load_profile(device="cpu", path: str | os.PathLike | None = None, *, fallback: bool = False) -> DeviceProfile:
    """Load the stored profile of ``device`` (or the file ``path``).

    A missing, corrupt, other-version or other-device file raises `ProfileError` naming the file and the
    problem, unless ``fallback=True``, in which case ``default_profile(device)`` is returned instead.
    """
    kind = device_key(device)
    target = Path(path) if path is not None else profile_path(kind)
    try:
        try:
            text = target.read_text()
        except OSError as exc:
            raise ProfileError(f"profile {target}: cannot be read ({exc.strerror or exc}); run "
                               f"einfx.calibrate({kind!r}) to create it") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile {target}: corrupt JSON ({exc.msg} at line {exc.lineno}); delete it "
                               f"or run einfx.calibrate({kind!r}) again") from exc
        profile = DeviceProfile.from_dict(data, source=str(target))
        if profile.device != kind:
            raise ProfileError(f"profile {target}: measured on device {profile.device!r}, requested for "
                               f"{kind!r}; use a profile of the same device kind")
        return profile
    except ProfileError:
        if fallback:
            return default_profile(kind)
        raise
