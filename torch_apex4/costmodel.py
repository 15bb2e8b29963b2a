"""Predicted time of the apex4 linear layers from rho, bandwidth and counted work.

For y[M, N] = x[M, K] W[N, K]^T at a granularity (None: per channel, or a
group size g; Kp = K padded to the group, G = Kp / g groups) and a GEMM kernel
variant, the model counts

    mma      2 * Mp * N * Kp integer ops on the tensor cores (Mp: M rounded up to
             the kernel's MMA tile: 128 for the tiled kernels, 8 for decode)
    dequant  Mp * N * G partial sums turned into floats on the CUDA cores: one
             I2F, one FMUL (sa * sw) and one FFMA each (G = 1 per channel: the
             epilogue)
    bytes    packed operands, scales and the fp16 output from DRAM (decode: the
             weights once per 16 tokens)
    fixed    one launch per kernel

and predicts, for the tiled kernels (wgmma, mma.sync),

    t = fixed + max(bytes / (bandwidth e_bw),
                    [mma / (R_mma e_mma) + dequant (2 / R_fp32i + 1 / R_i2f) / e_deq] / waves)

and for the memory-bound decode kernel

    t = fixed + max(bytes / (bandwidth e_bw), mma / R_mma) + dequant (...) / e_deq_decode.

The dequantization is *added* to the MMA time, not overlapped with it: the
per-group kernels fold each group's partial sums, in the warps that issued
its MMAs, after waiting for them. With R_mma = rho * R_fp32 the ratio of the
two terms is about 4 rho / g (I2F at half the FFMA instruction rate, as on an
H100): that is how rho decides between per-group and per-channel kernels.
`waves` is the fraction of the last wave of output tiles that is busy.

The e_* efficiencies (Calibration) are what the kernels reach of the peak
rates; the defaults were fitted to H100 measurements (benchmarks/results,
`benchmarks/cost_model_check.py --fit` refits them to a bench_gemm JSON) and
carry over to other GPUs, whose rates come from the rho table.
"""
import math
from dataclasses import dataclass, fields, replace
from typing import Iterable, Optional

from .ops import padded_k
from .plan import Granularity
from .rho import GpuSpec


DECODE, WGMMA, MMA_SYNC = "decode", "wgmma", "mma.sync"
VARIANTS = (DECODE, WGMMA, MMA_SYNC)
# APEX4_GEMM_PATH values and the variant each runs (csrc/cuda/ops_cuda.cu).
# sm80 is the INT4 mma.sync kernel: the model counts it only where INT4 is the
# GPU's tensor kind (Hopper emulates it).
PATH_VARIANTS = {"decode": DECODE, "sm90": WGMMA, "sm90mma": MMA_SYNC, "sm80": MMA_SYNC}

# Mirrors of the kernels' rules (csrc/cuda/launch.h, ops_cuda.cu): the decode
# path up to 16 tokens, tiles of 128 rows, the wgmma kernel's per-group loop
# in whole 128-value slices (other group lengths run the mma.sync kernel), K
# padded to 64 per channel.
DECODE_MAX_TOKENS = 16
DECODE_TOKEN_TILE = 8
DECODE_WEIGHT_REUSE = 16
TILE_M = 128
WGMMA_GROUP_MULTIPLE = 128
K_ALIGN = padded_k(1, None)  # int4.h's K alignment (the per-channel unit), 64


@dataclass(frozen=True)
class Calibration:
    """Fractions of peak the kernels reach, and fixed costs (seconds).

    launch_s: fixed cost per kernel as bench_gemm.py times it (cold, dirty L2).
    bandwidth: of the spec's DRAM bandwidth. fp16: cuBLAS of the FP16 peak.
    wgmma_mma / mma_sync_mma: the tiled kernels' MMA main loop, of the
    variant's peak (wgmma: tensor_tops; mma.sync: tensor_tops *
    mma_sync_fraction). tiled_dequant / decode_dequant: the per-group fold, of
    the CUDA cores' I2F and FP32 rates.
    quantize_s_per_value: quantize_act over many rows (whole GPU), seconds per
    x value; quantize_row_s_per_value: along one row (one block per row)."""

    # Fitted (cost_model_check.py --fit) to the grid of benchmarks/results/
    # 2026-12-07c/h100_bench_gemm.json (H100 SXM, the kernels with the staged
    # wgmma epilogue; 180 cells, median error 1.046x, max 1.31x in sample).
    # mma_sync_mma is from the earlier grid with forced paths (this one has none).
    launch_s: float = 9.55e-6
    bandwidth: float = 0.835
    fp16: float = 0.702
    wgmma_mma: float = 0.594
    mma_sync_mma: float = 0.55
    tiled_dequant: float = 0.294
    decode_dequant: float = 0.0757
    quantize_s_per_value: float = 1.46e-12
    quantize_row_s_per_value: float = 3.55e-10

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Estimate:
    """A predicted time and its parts (seconds): total = fixed + quantize + the
    rest as the model combines them (see the module docstring)."""

    variant: str
    total: float
    fixed: float
    memory: float
    mma: float
    dequant: float
    quantize: float = 0.0  # the layer's activation quantization (linear only)


def _check_problem(m, n, k, group_size):
    for name, v in (("M", m), ("N", n), ("K", k)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"cost model: {name} must be a positive int, got {v!r}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                   or group_size <= 0 or group_size % K_ALIGN):
        raise ValueError(f"cost model: group size must be None or a positive multiple of "
                         f"{K_ALIGN}, got {group_size!r}")


class CostModel:
    """Time predictions for one GPU (a GpuSpec of rho.py) and calibration."""

    def __init__(self, spec: GpuSpec, calibration: Calibration = Calibration()):
        self.spec = spec
        self.cal = calibration
        self._fp32_instr = spec.fp32_tflops * 1e12 / 2  # FMA instructions per second
        self._i2f = spec.i2f_tops * 1e12
        self._bandwidth = spec.bandwidth_tbs * 1e12 * calibration.bandwidth

    def with_calibration(self, calibration: Calibration) -> "CostModel":
        return CostModel(self.spec, calibration)

    # -------------------------------------------------------------- variants
    def variants(self):
        """The GEMM variants this GPU runs."""
        return (DECODE, WGMMA, MMA_SYNC) if self.spec.has_wgmma else (DECODE, MMA_SYNC)

    def auto_variant(self, m: int, group_size: Granularity) -> str:
        """The variant w4a4_gemm picks by itself (APEX4_GEMM_PATH=auto)."""
        if m <= DECODE_MAX_TOKENS:
            return DECODE
        if self.spec.has_wgmma and (group_size is None or group_size % WGMMA_GROUP_MULTIPLE == 0):
            return WGMMA
        return MMA_SYNC

    def path_variant(self, path: str, group_size: Granularity) -> Optional[str]:
        """The variant an APEX4_GEMM_PATH value runs here; None where the model
        has no rate for it (the INT4 mma.sync path on a GPU without INT4 MMA)."""
        if path not in PATH_VARIANTS:
            raise ValueError(f"unknown APEX4_GEMM_PATH {path!r}; one of {sorted(PATH_VARIANTS)}")
        if path == "sm80" and self.spec.tensor_kind != "int4":
            return None
        variant = PATH_VARIANTS[path]
        if variant == WGMMA and not (self.spec.has_wgmma and (
                group_size is None or group_size % WGMMA_GROUP_MULTIPLE == 0)):
            return MMA_SYNC
        return variant

    def _mma_rate(self, variant):
        peak = self.spec.tensor_tops * 1e12
        if variant == WGMMA:
            return peak * self.cal.wgmma_mma
        if variant == MMA_SYNC:
            return peak * self.spec.mma_sync_fraction * self.cal.mma_sync_mma
        return peak * self.spec.mma_sync_fraction  # decode: mma.sync, never the bottleneck

    def _dequant_s(self, outputs):
        """CUDA-core time at peak of `outputs` partial sums: I2F + FMUL + FFMA."""
        return outputs * (2 / self._fp32_instr + 1 / self._i2f)

    # ---------------------------------------------------------------- GEMMs
    def gemm(self, m: int, n: int, k: int, group_size: Granularity,
             variant: Optional[str] = None) -> Estimate:
        """w4a4_gemm on already quantized activations (default variant: auto)."""
        _check_problem(m, n, k, group_size)
        variant = variant or self.auto_variant(m, group_size)
        if variant not in self.variants():
            raise ValueError(f"variant {variant!r} does not run on {self.spec.name}; "
                             f"one of {self.variants()}")
        kp = padded_k(k, group_size)
        groups = 1 if group_size is None else kp // group_size
        scales = 4 * groups
        if variant == DECODE:
            mp = -(-m // DECODE_TOKEN_TILE) * DECODE_TOKEN_TILE
            weight_reads = -(-m // DECODE_WEIGHT_REUSE)
            bytes_ = n * (kp // 2 + scales) * weight_reads + m * (kp // 2 + scales) + 2 * m * n
            memory = bytes_ / self._bandwidth
            mma = 2 * mp * n * kp / self._mma_rate(DECODE)
            dequant = self._dequant_s(mp * n * groups) / self.cal.decode_dequant
            total = self.cal.launch_s + max(memory, mma) + dequant
            return Estimate(variant, total, self.cal.launch_s, memory, mma, dequant)
        mp = -(-m // TILE_M) * TILE_M
        bytes_ = n * (kp // 2 + scales) + m * (kp // 2 + scales) + 2 * m * n
        memory = bytes_ / self._bandwidth
        busy = self._wave_fraction(m, n, group_size)
        mma = 2 * mp * n * kp / self._mma_rate(variant) / busy
        dequant = self._dequant_s(mp * n * groups) / self.cal.tiled_dequant / busy
        total = self.cal.launch_s + max(memory, mma + dequant)
        return Estimate(variant, total, self.cal.launch_s, memory, mma, dequant)

    def _wave_fraction(self, m, n, group_size):
        """Busy fraction of the SMs over the waves of output tiles (one block
        per SM): 128 x 256 tiles per channel while they fill the GPU, else 128 x 128."""
        sms = self.spec.sms
        rows = -(-m // TILE_M)
        tiles = rows * -(-n // 256)
        if group_size is not None or tiles < sms:
            tiles = rows * -(-n // 128)
        return tiles / (math.ceil(tiles / sms) * sms)

    def quantize(self, m: int, k: int, group_size: Granularity) -> float:
        """quantize_act of x [M, K] fp16 (seconds)."""
        return self.cal.launch_s + self._quantize_work(m, k, group_size)

    def _quantize_work(self, m, k, group_size):
        kp = padded_k(k, group_size)
        groups = 1 if group_size is None else kp // group_size
        memory = m * (2 * k + kp // 2 + 4 * groups) / self._bandwidth
        return max(memory, m * k * self.cal.quantize_s_per_value,
                   k * self.cal.quantize_row_s_per_value)

    def linear(self, m: int, n: int, k: int, group_size: Granularity,
               variant: Optional[str] = None) -> Estimate:
        """The layer, fp16 x in: quantize_act + w4a4_gemm; for decode,
        w4a4_linear's pair, whose GEMM is the quantizer's dependent launch (its
        launch cost hidden, not its work)."""
        g = self.gemm(m, n, k, group_size, variant)
        if g.variant == DECODE and m <= DECODE_MAX_TOKENS:
            extra = self._quantize_work(m, k, group_size)
        else:
            extra = self.quantize(m, k, group_size)
        return replace(g, total=g.total + extra, quantize=extra)

    def best(self, m: int, n: int, k: int, group_size: Granularity,
             layer: bool = True, variants: Optional[Iterable[str]] = None) -> Estimate:
        """The fastest variant's estimate (of the layer, or of the GEMM alone)."""
        estimate = self.linear if layer else self.gemm
        return min((estimate(m, n, k, group_size, v) for v in (variants or self.variants())),
                   key=lambda e: e.total)

    def fp16(self, m: int, n: int, k: int) -> float:
        """FP16 F.linear (cuBLAS) for comparison (seconds)."""
        _check_problem(m, n, k, None)
        memory = 2 * (m * k + n * k + m * n) / self._bandwidth
        compute = 2 * m * n * k / (self.spec.fp16_tflops * 1e12 * self.cal.fp16)
        return self.cal.launch_s + max(memory, compute)

    # ------------------------------------------------------- measured methods
    def predict_method(self, method: str, m: int, n: int, k: int,
                       group_size: Granularity) -> Optional[float]:
        """Predicted seconds of a bench_gemm.py method ("fp16", "apex4 gemm",
        "apex4 linear", "apex4 quant+gemm", "apex4 gemm:<path>"); None for
        methods the model does not cover (int8, fp8, INT4 MMA emulation)."""
        if method == "fp16":
            return self.fp16(m, n, k)
        if method == "apex4 gemm":
            return self.gemm(m, n, k, group_size).total
        if method == "apex4 linear":
            return self.linear(m, n, k, group_size).total
        if method == "apex4 quant+gemm":
            return self.quantize(m, k, group_size) + self.gemm(m, n, k, group_size).total
        if method.startswith("apex4 gemm:"):
            variant = self.path_variant(method.split(":", 1)[1], group_size)
            return None if variant is None else self.gemm(m, n, k, group_size, variant).total
        return None


def fit(model: CostModel, measurements, rounds: int = 6) -> Calibration:
    """A Calibration that minimises the squared log error of model.predict_method
    over measurements: (method, m, n, k, group_size, seconds) tuples. Coordinate
    search, each field scaled by factors from 2x down to 2% while that helps;
    fields no measurement depends on stay as they are."""
    data = [mm for mm in measurements if model.predict_method(*mm[:5]) is not None]
    if not data:
        raise ValueError("fit: no measurement the cost model covers")

    def loss(cal):
        m2 = model.with_calibration(cal)
        return sum(math.log(m2.predict_method(*mm[:5]) / mm[5]) ** 2 for mm in data)

    cal, best = model.cal, loss(model.cal)
    for step in (2.0, 1.4, 1.2, 1.1, 1.05, 1.02)[:rounds]:
        improved = True
        while improved:
            improved = False
            for f in fields(Calibration):
                for factor in (step, 1 / step):
                    value = getattr(cal, f.name) * factor
                    if f.name in _FRACTIONS and value > 1.0:
                        continue
                    trial = replace(cal, **{f.name: value})
                    trial_loss = loss(trial)
                    if trial_loss < best * (1 - 1e-9):
                        cal, best, improved = trial, trial_loss, True
    return cal


# Calibration fields that are fractions of a peak rate (at most 1).
_FRACTIONS = ("bandwidth", "fp16", "wgmma_mma", "mma_sync_mma", "tiled_dequant", "decode_dequant")
