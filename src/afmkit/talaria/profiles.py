"""Device profiles for Talaria's roofline: peak FLOP/s, memory bandwidth, energy per byte and per
FLOP. ``this-cpu`` is measured on this machine (``analysis.probe_cpu``); the others come from
public figures, each with its source. All of them are ESTIMATES: a roofline is a bound (an op
takes at least its bytes over the bandwidth and its FLOPs over the peak), and the energies are
order-of-magnitude figures from the papers and datasheets cited, not measurements of these
devices running this model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from afmkit.errors import UserError

# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm table:
# a 32-bit DRAM read 640 pJ (20 pJ/bit); fp32 multiply 3.7 pJ + add 0.9 pJ (one FMA = 2 FLOPs).
HOROWITZ = "M. Horowitz, 'Computing's energy problem', ISSCC 2014 (45 nm): 32-bit DRAM read 640 pJ, fp32 mult 3.7 pJ + add 0.9 pJ"
HOROWITZ_DRAM_PJ_PER_BYTE = 640 / 4
HOROWITZ_FP32_PJ_PER_FLOP = (3.7 + 0.9) / 2
HOROWITZ_INT8_PJ_PER_OP = (0.2 + 0.03) / 2  # 8-bit mult 0.2 pJ + add 0.03 pJ
# O'Connor et al., "Fine-Grained DRAM", MICRO 2017: HBM2 about 3.9 pJ/bit, GDDR5 about 14 pJ/bit.
OCONNOR = "M. O'Connor et al., 'Fine-Grained DRAM', MICRO 2017: HBM2 ~3.9 pJ/bit, GDDR5 ~14 pJ/bit"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    name: str
    label: str
    peak_flops: float  # FLOP/s (or op/s for integer engines)
    bandwidth: float  # bytes/s from main memory
    pj_per_byte: float  # energy to move one byte from main memory
    pj_per_flop: float
    measured: bool  # True only for this machine's probed figures
    sources: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sources": list(self.sources), "estimate": True}


PUBLIC_PROFILES = (
    DeviceProfile(
        name="phone-npu",
        label="phone NPU (Apple A17 Pro Neural Engine, iPhone 15 Pro)",
        peak_flops=35e12,
        bandwidth=51.2e9,
        pj_per_byte=5.0 * 8,  # LPDDR5 taken as about 5 pJ/bit (between HBM2 and GDDR5): estimate
        pj_per_flop=HOROWITZ_INT8_PJ_PER_OP,
        measured=False,
        sources=(
            "Apple newsroom, 12 Sep 2023 (iPhone 15 Pro): A17 Pro Neural Engine 'up to 35 trillion operations per second'",
            "memory: LPDDR5-6400 on a 64-bit bus = 51.2 GB/s (teardown-reported LPDDR5; estimate)",
            OCONNOR + " (LPDDR5 assumed ~5 pJ/bit)",
            HOROWITZ + "; 8-bit mult 0.2 pJ + add 0.03 pJ per MAC",
        ),
    ),
    DeviceProfile(
        name="laptop-gpu",
        label="laptop GPU (NVIDIA GeForce RTX 4060 Laptop)",
        peak_flops=3072 * 2.37e9 * 2,  # CUDA cores x boost clock x 2 FLOPs per FMA = 14.6 TFLOP/s fp32
        bandwidth=256e9,  # 128-bit bus x 16 Gbps GDDR6
        pj_per_byte=14 * 8,  # GDDR5's figure as an upper bound for GDDR6
        pj_per_flop=115 / (3072 * 2.37e9 * 2) * 1e12,  # max graphics power / peak: a whole-board upper bound
        measured=False,
        sources=(
            "NVIDIA GeForce RTX 4060 Laptop GPU specifications: 3072 CUDA cores, boost up to 2370 MHz, "
            "8 GB GDDR6 on a 128-bit bus (16 Gbps), 35-115 W",
            OCONNOR + " (GDDR5 as an upper bound for GDDR6)",
        ),
    ),
    DeviceProfile(
        name="h200",
        label="NVIDIA H200 SXM (one GPU)",
        peak_flops=989e12,  # dense BF16 tensor-core
        bandwidth=4.8e12,
        pj_per_byte=3.9 * 8,  # HBM2's figure; HBM3e is no worse
        pj_per_flop=700 / 989e12 * 1e12,  # max TDP / peak: a whole-board upper bound
        measured=False,
        sources=(
            "NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e at 4.8 TB/s, BF16 989 TFLOPS dense "
            "(1,979 with sparsity), max TDP 700 W",
            OCONNOR,
        ),
    ),
)
PROFILE_NAMES = ("this-cpu", *(p.name for p in PUBLIC_PROFILES))


def cpu_profile(probe: dict[str, float]) -> DeviceProfile:
    """This machine, from ``analysis.probe_cpu``'s measured bandwidth and FLOP/s."""
    return DeviceProfile(
        name="this-cpu",
        label=f"this CPU ({probe.get('cpu', 'unknown')}, {probe.get('threads', '?')} threads; measured)",
        peak_flops=probe["flops"],
        bandwidth=probe["bandwidth"],
        pj_per_byte=HOROWITZ_DRAM_PJ_PER_BYTE,
        pj_per_flop=HOROWITZ_FP32_PJ_PER_FLOP,
        measured=True,
        sources=(
            "peak FLOP/s: measured, a jitted fp32 1024x1024 matmul (median of repeats)",
            "bandwidth: measured, a jitted sum over a 256 MiB array (median of repeats)",
            HOROWITZ + " (energies: estimates, not measured)",
        ),
    )


def check_profile(name: str) -> str:
    """The profile name, or one line naming the known ones (checked before any model loads)."""
    if name not in PROFILE_NAMES:
        raise UserError(f"unknown device profile {name!r}; use one of: {', '.join(PROFILE_NAMES)}")
    return name


def profiles(probe: dict[str, float]) -> list[DeviceProfile]:
    return [cpu_profile(probe), *PUBLIC_PROFILES]
