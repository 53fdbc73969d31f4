"""The environment every benchmark JSON records (imported by the scripts beside it)."""

from __future__ import annotations

import os
import platform

import torch


def environment(device: str) -> dict:
    """Versions, cores, threads, load, OMP/MKL variables and the device (TF32 flags on CUDA)."""
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "dtype": "float32", "device": device,
           "loadavg_start": os.getloadavg(),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_"))}}
    if device == "cuda":
        env.update(device_name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env
