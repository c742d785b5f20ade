"""Size, parameter, MAC and latency measurements shared by tests, stages and benchmarks, and
the name of the CPU they ran on."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from visionflow.compression.onnx_export import OrtClassifier

Runner = Callable[[torch.Tensor], Callable[[], Any]]  # input batch -> zero-arg timed call


def model_size_bytes(path: str | Path) -> int:
    """Bytes on disk of a checkpoint or ONNX file (plus an ONNX external-data sidecar if any)."""
    path = Path(path)
    size = path.stat().st_size
    sidecar = path.with_name(path.name + ".data")
    return size + (sidecar.stat().st_size if sidecar.exists() else 0)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at `input_shape` (N x C x H x W), by torch-pruning.

    torch-pruning's counter (from ptflops) reports MACs for conv/linear/bn/pooling layers.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    example = torch.zeros(*input_shape, device=device)
    macs, _ = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs)


def batch_of(example: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat one example (C x H x W or 1 x C x H x W) into a contiguous batch."""
    one = example if example.dim() == 4 else example.unsqueeze(0)
    return one[:1].expand(batch, *one.shape[1:]).contiguous()


def _time_calls(call: Callable[[], Any], reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times: list[float], threads: int) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(times),
        "p90_ms": float(np.percentile(times, 90)),
        "threads": threads,
        "reps": len(times),
    }


def cpu_latency_ms(
    fn: Callable[[torch.Tensor], Any],
    example: torch.Tensor,
    batch: int = 1,
    reps: int = 30,
    warmup: int = 5,
) -> dict[str, Any]:
    """Median / p90 wall time (ms) of `fn(batch tensor)` under `torch.inference_mode`.

    Warm-up calls are excluded; `threads` is `torch.get_num_threads()` at measurement time.
    """
    x = batch_of(example.cpu(), batch)
    with torch.inference_mode():
        times = _time_calls(lambda: fn(x), reps, warmup)
    return {**_summary(times, torch.get_num_threads()), "batch": batch}


def ort_latency_ms(
    session: Any,
    example: torch.Tensor | np.ndarray,
    batch: int = 1,
    reps: int = 30,
    warmup: int = 5,
) -> dict[str, Any]:
    """Same as `cpu_latency_ms` for an `onnxruntime.InferenceSession` or an `OrtClassifier`.

    Times `session.run` directly on a prepared float32 array (no conversion inside the loop).
    """
    sess = getattr(session, "session", session)
    x = batch_of(torch.as_tensor(example).float(), batch).numpy()
    feed = {sess.get_inputs()[0].name: x}
    times = _time_calls(lambda: sess.run(None, feed), reps, warmup)
    threads = sess.get_session_options().intra_op_num_threads
    return {**_summary(times, threads), "batch": batch}


def interleaved_latency_ms(
    runners: dict[str, Callable[[], Any]], reps: int = 30, warmup: int = 5, threads: int = 0
) -> dict[str, dict[str, Any]]:
    """Time several zero-argument callables round-robin (one call each per round, starting
    point rotated), so load changes on a shared CPU hit every variant alike.

    Returns `{name: {median_ms, p90_ms, threads, reps}}`; `threads` defaults to torch's.
    """
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]
            start = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    threads = threads or torch.get_num_threads()
    return {name: _summary(t, threads) for name, t in times.items()}


def eager_runner(model: nn.Module) -> Runner:
    """A torch module as a `Runner`: `model(x)` per call."""
    return lambda x: (lambda: model(x))


def ort_runner(path: str | Path) -> Runner:
    """An ONNX file as a `Runner`: `session.run` on the batch converted once, outside the
    timed call (intra-op threads = torch's, as `OrtClassifier` sets them)."""
    clf = OrtClassifier(path)

    def make(x: torch.Tensor) -> Callable[[], Any]:
        feed = {clf.input_name: x.numpy()}
        return lambda: clf.session.run(None, feed)

    return make


def cuda_available() -> bool:
    return torch.cuda.is_available()


def gpu_latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    batch: int = 1,
    reps: int = 30,
    warmup: int = 5,
    device: str | torch.device = "cuda",
) -> dict[str, Any] | None:
    """Median / p90 ms of `model(batch)` on a CUDA device, synchronised around each call
    (so it is the GPU's time, not the launch's); None when CUDA is not available. The model
    is copied to the device; the input is prepared there before timing."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    m = copy.deepcopy(model).to(dev).eval()
    x = batch_of(example, batch).to(dev)

    def call() -> None:
        m(x)
        torch.cuda.synchronize(dev)

    with torch.inference_mode():
        times = _time_calls(call, reps, warmup)
    return {**_summary(times, torch.get_num_threads()), "batch": batch,
            "device": torch.cuda.get_device_name(dev)}
