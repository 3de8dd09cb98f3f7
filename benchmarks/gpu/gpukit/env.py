"""Phase env: the machine and the library versions, and the two ceilings later figures are compared against.

bf16 matrix TFLOP/s (an N x N x N product on random data) and device-copy GB/s (bytes read plus bytes written), each
the median of timed repeats after warm-ups, timed with a synchronize around the host clock.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
from typing import Any

from .common import median, synchronize
from .report import PhaseContext

PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "gguf",
    "pyarrow",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "numpy",
)


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    import torch

    found["cuda (torch)"] = str(torch.version.cuda)
    found["python"] = platform.python_version()
    return found


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
        )
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm", "--format=csv,noheader"]
            info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            info["nvidia_smi"] = f"unavailable ({error})"
    else:
        info["gpu"] = "none (CPU)"
    return info


def _timed(fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return median(times)


def matmul_tflops(n: int, device: str) -> dict[str, float]:
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    seconds = _timed(lambda: torch.matmul(a, b, out=out), warmup=3, repeats=10)
    reference = a[:64].double() @ b.double()  # a slice checked against float64: the product is a real one
    error = ((out[:64].double() - reference).norm() / reference.norm()).item()
    return {"tflops": 2 * n**3 / seconds / 1e12, "relative_error": error, "n": n}


def copy_gbs(mib: int, device: str) -> dict[str, float]:
    import torch

    count = mib * 2**20 // 4
    source = torch.rand(count, device=device)
    target = torch.empty_like(source)
    seconds = _timed(lambda: target.copy_(source), warmup=3, repeats=20)
    if not torch.equal(source[:1024], target[:1024]):
        raise RuntimeError("the copy did not copy")
    return {"gbs": 2 * count * 4 / seconds / 1e9, "bytes_each_way": count * 4}


def run(ctx: PhaseContext) -> None:
    ctx.check("machine", machine)
    ctx.check("versions", versions)
    matmul = ctx.check("bf16 matmul peak", lambda: matmul_tflops(ctx.sizes.matmul_n, ctx.device))
    if matmul:
        ctx.metric("peak_bf16_tflops", matmul["tflops"])
        ctx.shared["peak_tflops"] = matmul["tflops"]
        if matmul["relative_error"] > 2e-2:
            ctx.cut(f"bf16 matmul relative error {matmul['relative_error']:.2e} is above 2e-2: check the device")
    copy = ctx.check("device copy bandwidth", lambda: copy_gbs(ctx.sizes.copy_mib, ctx.device))
    if copy:
        ctx.metric("peak_copy_gbs", copy["gbs"])
        ctx.shared["peak_gbs"] = copy["gbs"]
