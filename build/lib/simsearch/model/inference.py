"""Fused CPU inference: the backbone traced and frozen with TorchScript (fp32 by default; bf16 when asked).

`torch.jit.freeze` inlines the weights, folds every batch norm into the convolution before it and
fuses conv + add + relu, so oneDNN runs one kernel where eager PyTorch runs three. Measured on 2 cores
of an AMD EPYC (docs/BENCHMARKS.md): 1.3x eager channels-last for fp32, and with bf16 weights on a CPU
with native bf16 (AVX512-BF16 or AMX) 2.5x eager fp32 and about 1.4x eager bf16 autocast. oneDNN
Graph fusion (`torch.jit.enable_onednn_fusion`) was measured too: no faster here, and slower to
prepare, which a whole `simsearch extract` process pays on every run. `torch.compile` needs a C++
compiler at run time and compiles in every process; it stays the GPU option (`model.compile`).

`model.inference`: `auto` (frozen on a CPU, eager on a GPU, where bf16 autocast, channels-last and
`model.compile` apply), `frozen`, or `eager`. A backbone that cannot be traced, or whose frozen copy
does not give the eager network's embeddings (cosine below `MIN_COSINE` on check images), runs eagerly.

On a CPU the default precision is fp32: bf16 (`trainer.precision=bf16-mixed`) was measured below the
0.999 cosine to fp32 that a store needs for exact duplicates and self-search (docs/backbones.md). The
path taken (frozen or eager) and the precision are recorded in the manifest, part of the store's
fingerprint, and used again for every query (`simsearch.model.query`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)
INFERENCE_MODES = ("auto", "frozen", "eager")
# Smallest cosine between the frozen and the eager embeddings of the check images, by dtype.
MIN_COSINE = {torch.float32: 0.9999, torch.bfloat16: 0.999}


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX): only there is bf16 faster than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None for check in checks):
        return any(check() for check in checks if check is not None)
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype a CPU extraction computes in: `trainer.precision` when given, else fp32. None: a precision
    freezing cannot run."""
    if precision is None:
        return torch.float32
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision in ("32", "32-true"):
        return torch.float32
    return None


class FrozenNetwork(nn.Module):
    """A frozen TorchScript copy of a network: casts its input to `dtype`, returns float32 features."""

    def __init__(self, scripted: torch.jit.ScriptModule, dtype: torch.dtype):
        super().__init__()
        self.scripted = scripted
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scripted(images.to(self.dtype)).float()


def freeze_network(network: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> FrozenNetwork:
    """Trace a copy of `network` in `dtype` on `example` (its memory format is kept) and freeze it."""
    network = copy.deepcopy(network).eval().to(dtype)
    if example.is_contiguous(memory_format=torch.channels_last):
        network = network.to(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.compile, which on a CPU needs a C++ compiler and tens of
        # seconds per process; where TorchScript is gone, the AttributeError sends the run to the eager path.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # what they warn of, the comparison checks
        traced = torch.jit.trace(network, example.to(dtype), check_trace=False)
        return FrozenNetwork(torch.jit.freeze(traced), dtype)


def check_images(preprocess: nn.Module, count: int, channels_last: bool, seed: int = 0) -> torch.Tensor:
    """`count` smooth random images through the embedder's preprocessing: inputs to trace and to compare on."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (count, 3, 8, 8), generator=generator, dtype=torch.uint8)
    pixels = F.interpolate(small.float(), size=(32, 32), mode="bilinear").round().to(torch.uint8)
    with torch.no_grad():
        images = preprocess(pixels)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def frozen_or_eager(backbone: nn.Module, images: torch.Tensor, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The frozen copy of `backbone` if it traces and agrees with the eager one, else `backbone` and why not.

    Traced on one image and compared on the others, so a batch size baked into the trace shows here.
    """
    try:
        frozen = freeze_network(backbone, images[:1], dtype)
        with torch.no_grad():
            expected = F.normalize(backbone(images).float(), dim=1)
            got = F.normalize(frozen(images), dim=1)
    except Exception as error:  # tracing fails in many ways: data-dependent control flow, unsupported ops
        return backbone, f"it could not be traced ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    cosine = float((expected * got).sum(dim=1).min()) if got.shape == expected.shape else float("nan")
    if not cosine >= MIN_COSINE[dtype]:
        return backbone, f"its frozen copy gave other embeddings (cosine {cosine:.5f} < {MIN_COSINE[dtype]})"
    return frozen, ""


def check_inference_mode(mode: str) -> None:
    if mode not in INFERENCE_MODES:
        raise SimsearchError(f"model.inference must be {', '.join(INFERENCE_MODES)}, not '{mode}'")


def prepare_inference(embedder: nn.Module, mode: str, precision: str | None, channels_last: bool,
                      on_gpu: bool) -> tuple[str, str]:
    """Freeze `embedder.backbone` in place for a CPU run, as `model.inference` says. Returns (the precision
    the vectors are computed in, the path: frozen or eager); the Lightning precision to run the embedder
    with is `trainer_precision(...)` of them."""
    check_inference_mode(mode)
    if on_gpu:
        if mode == "frozen":
            log.warning("model.inference=frozen is for CPUs: on a GPU the network runs eagerly (bf16 autocast, "
                        "channels-last, and torch.compile with model.compile=true)")
        return precision or "bf16-mixed", "eager"
    dtype = cpu_dtype(precision)
    eager_precision = precision or "32-true"
    if mode == "eager":
        return eager_precision, "eager"
    if dtype is None:
        log.warning("model.inference=%s: trainer.precision=%s cannot be frozen; the network runs eagerly", mode, precision)
        return eager_precision, "eager"
    images = check_images(embedder.preprocess, 2, channels_last)  # traced on one, compared on two
    backbone, reason = frozen_or_eager(embedder.backbone.eval(), images, dtype)
    if reason:  # a choice simsearch makes for this backbone: said only when the user asked for frozen
        (log.warning if mode == "frozen" else log.info)("model.inference=%s: the backbone runs eagerly because %s",
                                                         mode, reason)
        return eager_precision, "eager"
    embedder.backbone = backbone
    log.info("inference: frozen TorchScript backbone (weights inlined, batch norm folded, ops fused), %s",
             str(dtype).removeprefix("torch."))
    return eager_precision, "frozen"


def trainer_precision(precision: str, path: str) -> str:
    """The Lightning precision to run the embedder with: 32-true around a frozen network, which computes
    in its own dtype."""
    return "32-true" if path == "frozen" else precision
