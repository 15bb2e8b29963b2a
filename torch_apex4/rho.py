"""rho: how much faster a GPU's low-bit tensor cores are than its CUDA cores.

    rho = dense tensor-core rate of the MMA the W4A4 kernels use (TOP/s)
          / FP32 FMA rate of the CUDA cores (TFLOP/s, 2 FLOP per FMA)

The MMA is INT4 where the GPU has INT4 tensor cores (Ampere, Ada) and INT8 on
Hopper, which has none (its kernels unpack INT4 to INT8 on chip). Group-wise
quantization adds dequantization work on the CUDA cores for every group of
every output, so the larger rho, the more that work costs relative to the
MMAs, and the more per-channel granularity wins (costmodel.py).

This module is the one place rho comes from: `KNOWN_GPUS`, a table of vendor
figures, and `probe()`, which measures the rates on the current GPU (the
micro-benchmarks in csrc/cuda/probe.cu) for GPUs the table does not know.
`gpu_spec(device)` returns the table entry, else a cached probe, else probes
and caches. `python -m torch_apex4 probe` runs the probe and prints it.
"""
import ctypes
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class GpuSpec:
    """Dense peak rates of one GPU (no structured sparsity).

    tensor_tops: the W4A4 kernels' MMA (tensor_kind: "int4" or "int8"), peak.
    mma_sync_fraction: the rate mma.sync reaches on it as a fraction of
      tensor_tops (1 where mma.sync is the peak instruction; Hopper's peak
      needs wgmma). fp16_tflops: FP16 tensor cores with FP32 accumulation (what
      FP16 GEMMs run on). i2f_tops: int32 -> fp32 conversions, 10^12 per s.
    has_wgmma: compute capability 9.0 (the sm90 kernel path). source: where
      the numbers come from."""

    name: str
    sms: int
    fp32_tflops: float
    tensor_tops: float
    tensor_kind: str
    fp16_tflops: float
    bandwidth_tbs: float
    i2f_tops: float
    mma_sync_fraction: float = 1.0
    has_wgmma: bool = False
    source: str = ""

    @property
    def rho(self) -> float:
        return self.tensor_tops / self.fp32_tflops

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GpuSpec":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not {"name", "sms", "fp32_tflops"} <= set(d):
            raise ValueError(f"not a GpuSpec dict: {d!r}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _i2f_tops(per_clock_per_sm, sms, boost_ghz):
    return per_clock_per_sm * sms * boost_ghz * 1e-3


# int32 -> fp32 conversions per clock per SM. sm_80 code converts with I2F: 16
# (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table,
# "type conversions" row for compute capability 8.0). sm_86, sm_89 and sm_90
# code uses I2FP.F32.S32 (checked in the SASS of csrc/cuda/probe.cu), which the
# probe measured at 64 on an H100; 64 is assumed for GA10x/AD10x (not measured
# here). An extension built only for sm_80 runs I2F on those GPUs too.
_I2F_SM80, _I2F_I2FP = 16, 64

# (device-name pattern, spec); the first match wins, so specific names come
# first. Numbers are dense (without sparsity) from the vendor documents named
# in `source`; SM counts and boost clocks from the same documents.
KNOWN_GPUS = (
    (r"A100.*80GB PCIe", GpuSpec(
        "A100 80GB PCIe", 108, 19.5, 1248.0, "int4", 312.0, 1.935,
        _i2f_tops(_I2F_SM80, 108, 1.41),
        source="NVIDIA A100 Tensor Core GPU datasheet (FP32 19.5, FP16 TC 312, INT4 1248 TOPS, "
               "1935 GB/s)")),
    (r"A100.*80GB", GpuSpec(
        "A100 SXM4 80GB", 108, 19.5, 1248.0, "int4", 312.0, 2.039,
        _i2f_tops(_I2F_SM80, 108, 1.41),
        source="NVIDIA A100 Tensor Core GPU datasheet (FP32 19.5, FP16 TC 312, INT4 1248 TOPS, "
               "2039 GB/s)")),
    (r"A100", GpuSpec(
        "A100 40GB", 108, 19.5, 1248.0, "int4", 312.0, 1.555,
        _i2f_tops(_I2F_SM80, 108, 1.41),
        source="NVIDIA A100 Tensor Core GPU datasheet (FP32 19.5, FP16 TC 312, INT4 1248 TOPS, "
               "1555 GB/s)")),
    (r"RTX 3090", GpuSpec(
        "GeForce RTX 3090", 82, 35.6, 568.0, "int4", 71.0, 0.936,
        _i2f_tops(_I2F_I2FP, 82, 1.695),
        source="NVIDIA Ampere GA102 GPU Architecture whitepaper, RTX 3090 column (FP32 35.6, "
               "FP16 TC with FP32 accumulate 71, INT4 568 TOPS, 936 GB/s)")),
    (r"\bA40\b", GpuSpec(
        "A40", 84, 37.4, 598.7, "int4", 149.7, 0.696,
        _i2f_tops(_I2F_I2FP, 84, 1.74),
        source="NVIDIA A40 datasheet (FP32 37.4, FP16 TC 149.7, INT4 598.7 TOPS, 696 GB/s)")),
    (r"\bA10\b", GpuSpec(
        "A10", 72, 31.2, 500.0, "int4", 125.0, 0.600,
        _i2f_tops(_I2F_I2FP, 72, 1.695),
        source="NVIDIA A10 datasheet (FP32 31.2, FP16 TC 125, INT4 500 TOPS, 600 GB/s)")),
    (r"L40S", GpuSpec(
        "L40S", 142, 91.6, 733.0, "int4", 362.0, 0.864,
        _i2f_tops(_I2F_I2FP, 142, 2.52),
        source="NVIDIA L40S datasheet (FP32 91.6, FP16 TC 362, INT4 = INT8 733 TOPS, 864 GB/s)")),
    (r"RTX 4090", GpuSpec(
        "GeForce RTX 4090", 128, 82.6, 1321.2, "int4", 165.2, 1.008,
        _i2f_tops(_I2F_I2FP, 128, 2.52),
        source="NVIDIA Ada Lovelace GPU Architecture whitepaper, RTX 4090 column (FP32 82.6, "
               "FP16 TC with FP32 accumulate 165.2, INT4 1321.2 TOPS, 1008 GB/s)")),
    # Hopper: no INT4 tensor cores; the INT8 rate. mma.sync s8 reaches 1288 of the
    # 1979 TOP/s (this project's measurement); the rest needs wgmma.
    (r"H100.*PCIe", GpuSpec(
        "H100 PCIe", 114, 51.2, 1513.0, "int8", 756.0, 2.0,
        _i2f_tops(_I2F_I2FP, 114, 1.755), mma_sync_fraction=1288 / 1979, has_wgmma=True,
        source="NVIDIA H100 Tensor Core GPU datasheet, PCIe column (FP32 51, FP16 TC 756, "
               "INT8 1513 TOPS, 2.0 TB/s)")),
    (r"H100", GpuSpec(
        "H100 SXM5", 132, 66.9, 1979.0, "int8", 989.4, 3.35,
        _i2f_tops(_I2F_I2FP, 132, 1.98), mma_sync_fraction=1288 / 1979, has_wgmma=True,
        source="NVIDIA H100 Tensor Core GPU datasheet, SXM column (FP32 67, FP16 TC 989, "
               "INT8 1979 TOPS, 3.35 TB/s)")),
    (r"H200", GpuSpec(
        "H200 SXM", 132, 66.9, 1979.0, "int8", 989.4, 4.8,
        _i2f_tops(_I2F_I2FP, 132, 1.98), mma_sync_fraction=1288 / 1979, has_wgmma=True,
        source="NVIDIA H200 Tensor Core GPU datasheet (same compute as H100 SXM; 4.8 TB/s)")),
)


def known_gpu(device_name: str) -> Optional[GpuSpec]:
    """The table's spec for a device name as torch.cuda.get_device_name gives it, or None."""
    for pattern, spec in KNOWN_GPUS:
        if re.search(pattern, device_name):
            return spec
    return None


# ---------------------------------------------------------------- the probe

# Kinds of csrc/cuda/probe.cu (its ProbeKind enum).
_FFMA, _I2F, _MMA_S8, _MMA_S4, _WGMMA_S8 = range(5)
_TARGET_SECONDS = 0.02  # each timed launch runs at least this long
_REPEATS = 5


@dataclass(frozen=True)
class ProbeResult:
    """Rates measured on one GPU; TOP/s and TFLOP/s are 10^12 per second."""

    device: str
    driver: str
    sms: int
    ffma_tflops: float
    i2f_tops: float
    mma_s8_tops: float
    mma_s4_tops: float
    wgmma_s8_tops: Optional[float]  # None: no wgmma (not compute capability 9.0)
    fp16_mm_tflops: float           # torch.mm fp16 8192^3 (cuBLAS), for reference
    bandwidth_tbs: float            # device-to-device copy, bytes read + written

    def spec(self) -> GpuSpec:
        """The GpuSpec these rates define. The tensor rate is the fastest MMA the
        kernels can use: INT4 mma.sync only where it beats INT8 (it is emulated on
        Hopper), wgmma where it exists. Measured peaks stand for the vendor's,
        except FP16 (see below)."""
        from .costmodel import Calibration

        int8 = max(self.mma_s8_tops, self.wgmma_s8_tops or 0.0)
        kind, tensor = ("int4", self.mma_s4_tops) if self.mma_s4_tops > int8 else ("int8", int8)
        mma_sync = self.mma_s4_tops if kind == "int4" else self.mma_s8_tops
        # fp16_mm_tflops is what cuBLAS reaches; the spec holds the peak that the
        # cost model's cuBLAS efficiency turns back into that rate.
        fp16_peak = self.fp16_mm_tflops / Calibration().fp16
        return GpuSpec(self.device, self.sms, self.ffma_tflops, tensor, kind, fp16_peak,
                       self.bandwidth_tbs, self.i2f_tops, mma_sync_fraction=mma_sync / tensor,
                       has_wgmma=self.wgmma_s8_tops is not None,
                       source=f"probe (driver {self.driver})")

    def to_dict(self) -> dict:
        return asdict(self)


def _probe_library():
    from . import _C

    lib = ctypes.CDLL(_C.__file__)
    if not hasattr(lib, "apex4_probe_launch"):
        raise RuntimeError("this build of torch_apex4 has no CUDA probe kernels "
                           "(csrc/cuda/probe.cu is built only when torch has CUDA and nvcc is found)")
    lib.apex4_probe_launch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p]
    lib.apex4_probe_launch.restype = ctypes.c_int
    lib.apex4_probe_ops_per_block_iteration.argtypes = [ctypes.c_int]
    lib.apex4_probe_ops_per_block_iteration.restype = ctypes.c_double
    return lib


def _driver_version() -> str:
    """The NVIDIA driver's version (NVML, e.g. "580.159.04"), else the CUDA
    driver API version ("cuda 13.0"), else "unknown"."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlInit_v2() == 0 and nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0:
            return buffer.value.decode()
    except (OSError, AttributeError):
        pass
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda {version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def _best_seconds(launch, repeats=_REPEATS):
    """The shortest of `repeats` CUDA-event timings of launch() (a peak rate
    wants the least disturbed run)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return min(times)


class _Probe:
    def __init__(self, device):
        self.device = device
        self.lib = _probe_library()
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.threads = self.lib.apex4_probe_threads()

    def launch(self, kind, blocks, iterations, sink):
        status = self.lib.apex4_probe_launch(kind, blocks, iterations, sink.data_ptr(),
                                             torch.cuda.current_stream(self.device).cuda_stream)
        if status != 0:
            raise RuntimeError(f"apex4 probe kernel {kind} failed to launch: CUDA error {status}")

    def rate(self, kind, blocks_per_sm):
        """Ops per second of probe `kind` on every SM, in 10^12."""
        blocks = blocks_per_sm * self.sms
        sink = torch.empty(blocks * self.threads, dtype=torch.int32, device=self.device)
        iterations = 8
        while True:  # grow the loop until one launch takes _TARGET_SECONDS
            seconds = _best_seconds(lambda: self.launch(kind, blocks, iterations, sink), repeats=1)
            if seconds >= _TARGET_SECONDS or iterations >= 1 << 24:
                break
            iterations = min(1 << 24, int(iterations * max(2.0, 1.2 * _TARGET_SECONDS / seconds)))
        seconds = _best_seconds(lambda: self.launch(kind, blocks, iterations, sink))
        if kind == _WGMMA_S8 and int(sink[0]) == self.lib.apex4_probe_not_sm90a_sentinel():
            return None
        ops = self.lib.apex4_probe_ops_per_block_iteration(kind) * blocks * iterations
        return ops / seconds * 1e-12

    def bandwidth_tbs(self):
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        return 2 * n / _best_seconds(lambda: dst.copy_(src)) * 1e-12

    def fp16_mm_tflops(self):
        n = 8192
        a = torch.randn(n, n, dtype=torch.float16, device=self.device)
        b = torch.randn(n, n, dtype=torch.float16, device=self.device)
        torch.mm(a, b)
        return 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b)) * 1e-12


def probe(device=None) -> ProbeResult:
    """Measure the rates of a CUDA device (default: the current one); takes a few seconds."""
    if not torch.cuda.is_available():
        raise RuntimeError("the rho probe needs a CUDA GPU; none is available")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None \
        else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the rho probe runs on a CUDA device, got {device}")
    with torch.cuda.device(device):
        p = _Probe(device)
        return ProbeResult(
            device=torch.cuda.get_device_name(device), driver=_driver_version(), sms=p.sms,
            ffma_tflops=p.rate(_FFMA, 8), i2f_tops=p.rate(_I2F, 8),
            mma_s8_tops=p.rate(_MMA_S8, 4), mma_s4_tops=p.rate(_MMA_S4, 4),
            wgmma_s8_tops=p.rate(_WGMMA_S8, 1), fp16_mm_tflops=p.fp16_mm_tflops(),
            bandwidth_tbs=p.bandwidth_tbs())


# ---------------------------------------------------------------- the cache

def cache_path() -> Path:
    """$TORCH_APEX4_CACHE/rho.json, default ~/.cache/torch_apex4/rho.json."""
    root = os.environ.get("TORCH_APEX4_CACHE") or Path.home() / ".cache" / "torch_apex4"
    return Path(root) / "rho.json"


def cache_key(device_name: str, driver: str) -> str:
    return f"{device_name} | driver {driver}"


def read_cache(path: Optional[Path] = None) -> dict:
    """{cache key: probe dict} of the cache file; {} if it is missing or damaged."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # missing or damaged: probes are re-measured, not an error
    return data if isinstance(data, dict) else {}


def cached_probe(device_name: str, driver: str, path: Optional[Path] = None) -> Optional[ProbeResult]:
    entry = read_cache(path).get(cache_key(device_name, driver))
    try:
        return ProbeResult(**entry) if isinstance(entry, dict) else None
    except TypeError:  # written by another version of this module
        return None


def store_probe(result: ProbeResult, path: Optional[Path] = None) -> Path:
    path = path or cache_path()
    data = read_cache(path)
    data[cache_key(result.device, result.driver)] = result.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def gpu_spec(device=None, allow_probe: bool = True) -> GpuSpec:
    """The GpuSpec of a CUDA device: the table's entry for its name, else its
    cached probe, else (allow_probe) a new probe, cached. ValueError for a
    device that is not CUDA, LookupError for an unknown GPU without probing."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"rho is defined for CUDA GPUs, got device {device}")
    name = torch.cuda.get_device_name(device)
    spec = known_gpu(name)
    if spec is not None:
        return spec
    cached = cached_probe(name, _driver_version())
    if cached is not None:
        return cached.spec()
    if not allow_probe:
        raise LookupError(f"{name} is not in the rho table and has not been probed "
                          f"(run `python -m torch_apex4 probe`)")
    result = probe(device)
    store_probe(result)
    return result.spec()


def format_probe(result: ProbeResult) -> str:
    spec, table = result.spec(), known_gpu(result.device)
    wgmma = "-" if result.wgmma_s8_tops is None else f"{result.wgmma_s8_tops:.0f} TOP/s"
    lines = [
        f"device            {result.device} ({result.sms} SMs, driver {result.driver})",
        f"FFMA              {result.ffma_tflops:.1f} TFLOP/s",
        f"I2F (s32 -> f32)  {result.i2f_tops:.1f} T/s "
        f"({result.i2f_tops * 2 / result.ffma_tflops:.2f} x the FFMA instruction rate)",
        f"mma.sync s8       {result.mma_s8_tops:.0f} TOP/s",
        f"mma.sync s4       {result.mma_s4_tops:.0f} TOP/s",
        f"wgmma s8          {wgmma}",
        f"FP16 torch.mm     {result.fp16_mm_tflops:.0f} TFLOP/s",
        f"copy bandwidth    {result.bandwidth_tbs:.2f} TB/s",
        f"rho (measured)    {spec.rho:.1f} = {spec.tensor_kind.upper()} {spec.tensor_tops:.0f} "
        f"TOP/s / FP32 {spec.fp32_tflops:.1f} TFLOP/s",
    ]
    if table is not None:
        lines.append(f"rho (table)       {table.rho:.1f} = {table.tensor_kind.upper()} "
                     f"{table.tensor_tops:.0f} / {table.fp32_tflops:.1f} ({table.name})")
    else:
        lines.append("rho (table)       - (not in the table: the probe's value is used)")
    return "\n".join(lines)
