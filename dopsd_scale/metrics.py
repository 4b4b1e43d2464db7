"""Metrics: JSONL always, TensorBoard when installed; FLOPs, MFU and throughput helpers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device, for MFU (no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def device_peak_tflops(device: torch.device, override: float = 0.0) -> Optional[float]:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


class MetricsLogger:
    """Appends one JSON object per record to `<run>/metrics.jsonl`; mirrors to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (e.g. a validation grid) to TensorBoard when enabled; the PNG files on disk
        are the caller's, so without TensorBoard nothing is lost."""
        if not self.enabled or self._tb is None:
            return
        self._tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Throughput:
    """Samples/s, achieved FLOP/s and data-wait share over the steps since the last report."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.flops, self.data_wait = time.perf_counter(), 0, 0.0, 0.0

    def add(self, samples: int, flops: float, data_wait: float) -> None:
        self.samples += samples
        self.flops += flops
        self.data_wait += data_wait

    def report(self) -> dict[str, Any]:
        """This rank's rates since the last report (the trainer sums ranks and derives MFU)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {
            "samples_per_s": self.samples / elapsed,
            "tflops": self.flops / elapsed / 1e12,
            "data_wait_share": self.data_wait / elapsed,
        }
        self.reset()
        return out
