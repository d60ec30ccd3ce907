"""Plans a U-Net before it is built: pooling per axis from the voxel spacing, and peak memory.

Axis order: spatial sizes and spacings are ``(D, H, W)`` in 3D, D the slice (z) axis and
H, W the in-plane axes in the order of the 2D slices (canonical x, y; see
:mod:`kerasunet.core.nifti`). A canonical ``(x, y, z)`` volume becomes ``(D, H, W)`` with
``np.moveaxis(data, 2, 0)``: a 320×260×72 MRI volume of 1.2×1.2×3.0 mm voxels is
``(72, 320, 260)`` with spacing ``(3.0, 1.2, 1.2)``.

Memory model (:func:`estimate_memory`), for one training step with Adam:

* weights: every variable in float32 (BatchNorm statistics included); under mixed
  precision also a float16 copy of each trainable weight, cast for the step;
* gradients: one float32 value per trainable weight;
* optimiser state: Adam's two moments, float32, per trainable weight;
* activations: the layer outputs the backward pass keeps (:data:`NEEDS_INPUT`,
  :data:`NEEDS_OUTPUT`, :data:`OWN_COPIES`), the input included, at the layer's compute
  dtype (float16 under ``mixed_float16``, float32 for the input and the sigmoid head).

Calibration: ``benchmarks/memory.py`` measures one training step on CPU (TensorFlow,
float32) as peak RSS of a fresh process. Against the patch's share of it (peak minus the
RSS after a warm-up step), the activation estimate was 0.80, 0.93 and 0.99 of the
measurement at 16x64x64, 24x96x96 and 32x128x128 (filters 8, depth 3, batch 1, spacing
(3.0, 1.2, 1.2)), with no fitted factor. The fixed rest of a step on CPU (graph tracing,
kernel caches: about 165 MiB) is host memory and is not modelled, so at small patches the
estimate is well under the process's whole growth (0.25 of it at 16x64x64, 0.72 at
32x128x128). Not measured: the
mixed-precision figure (no GPU; Keras's BatchNorm computes in float32, so it may hold
more than the float16 counted here) and GPU kernel workspace (cuDNN), so leave a margin
on a GPU.

All layer sizes are read from the network itself, built once at the smallest valid size
(one multiple of each pooling factor): every layer's size is proportional to the number
of voxels, so the estimate for any valid patch is exact scaling, not a second copy of
the architecture.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

GIB = 2**30
ADAM_MOMENTS = 2
PRECISIONS = ("float32", "mixed_float16")
# The research's MRI (Wang & Tang): 320×260 in-plane, 72 slices, ~1.2×1.2×3.0 mm, in (D, H, W).
RESEARCH_VOLUME = (72, 320, 260)
RESEARCH_SPACING = (3.0, 1.2, 1.2)
RESEARCH_ARCH = {"filters": 32, "depth": 4, "channels": 1, "num_outputs": 1}


class MemoryBudgetError(ValueError):
    """The estimated peak memory is over the budget. The one-line message names a patch that fits."""


def pooling_plan(spacing, depth: int) -> tuple[tuple[int, ...], ...]:
    """Pool sizes per level and axis, from the voxel spacing, as nnU-Net's planner does.

    At each level an axis is pooled by 2 while its current spacing is at most twice the
    finest current spacing; the spacing of a pooled axis then doubles. Spacing
    ``(3.0, 1.2, 1.2)`` gives ``(1, 2, 2)`` at level 1 (3.0 > 2.4) and ``(2, 2, 2)`` from
    level 2 on (3.0 <= 2 × 2.4). Unlike nnU-Net, the size of the patch does not stop the
    pooling (the patch size rule of :func:`kerasunet.model.build_unet` follows the plan
    instead) and convolutions stay 3 wide on every axis.

    Args:
        spacing: Voxel size in mm per spatial axis, e.g. ``(D, H, W)``.
        depth: Number of pooling levels.

    Returns:
        ``depth`` tuples of 1 or 2 per axis.

    Raises:
        ValueError: a spacing is not a positive finite number, or depth < 1.
    """
    spacing = tuple(spacing)
    if not spacing or not all(isinstance(s, numbers.Real) and math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"Expected spacing of positive numbers in mm. Received: spacing={spacing}")
    if depth < 1:
        raise ValueError(f"Expected depth >= 1. Received: depth={depth}")
    current, plan = [float(s) for s in spacing], []
    for _ in range(depth):
        finest = min(current)
        level = tuple(2 if s <= 2 * finest * (1 + 1e-9) else 1 for s in current)
        current = [s * f for s, f in zip(current, level)]
        plan.append(level)
    return tuple(plan)


def pooling_factors(plan) -> tuple[int, ...]:
    """Total pooling factor per axis: the product of a plan's levels, e.g. ``(8, 16, 16)``."""
    return tuple(math.prod(level[axis] for level in plan) for axis in range(len(plan[0])))


def format_size(size) -> str:
    """``(48, 128, 128)`` as ``"48x128x128"``."""
    return "x".join(str(s) for s in size)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training step, in bytes per part (see the module docstring)."""

    patch_size: tuple[int, ...]
    batch_size: int
    precision: str
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        """One line, e.g. ``patch 48x128x128, batch 2, float32: 5.31 GiB (weights 0.09, ...)``."""
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}"
                          for name in ("weights", "gradients", "optimizer", "activations"))
        return (f"patch {format_size(self.patch_size)}, batch {self.batch_size}, {self.precision}: "
                f"{self.total_gib:.2f} GiB ({parts})")


# What TensorFlow's backward pass keeps of the forward pass, by layer class: the input of
# layers whose gradient needs it, the output of layers whose gradient needs that, and for
# Dropout two tensors of its size (the scaled input and the mask it multiplies by). Outputs
# nobody needs (BatchNorm before ReLU, Add, the transposed conv before Concatenate, the
# 1x1 projection before Add, the head conv before its sigmoid) are freed in the forward pass.
NEEDS_INPUT = {"Conv2D", "Conv3D", "Conv2DTranspose", "Conv3DTranspose", "BatchNormalization",
               "MaxPooling2D", "MaxPooling3D"}
NEEDS_OUTPUT = {"ReLU", "Activation", "MaxPooling2D", "MaxPooling3D"}
OWN_COPIES = {"Dropout": 2}


@dataclass(frozen=True)
class NetworkCounts:
    """What the memory model needs from a built network, per sample.

    Attributes:
        factors: Total pooling factor per axis (the smallest valid patch).
        weights: Number of weight values (trainable and not).
        trainable: Number of trainable weight values.
        saved_per_voxel: Activation values kept for the backward pass, per input voxel.
        half_per_voxel: Of those, the values a ``mixed_float16`` network holds in float16.
    """

    factors: tuple[int, ...]
    weights: int
    trainable: int
    saved_per_voxel: float
    half_per_voxel: float


def saved_tensors(model) -> list:
    """``(layer, copies)`` for each layer output the backward pass keeps (see :data:`NEEDS_INPUT`)."""
    producer = {id(layer.output): layer for layer in model.layers}
    copies = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in NEEDS_INPUT:
            inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
            for tensor in inputs:
                copies.setdefault(producer[id(tensor)].name, 1)
        if kind in NEEDS_OUTPUT:
            copies.setdefault(layer.name, 1)
        if kind in OWN_COPIES:
            copies[layer.name] = OWN_COPIES[kind]
    return [(layer, copies[layer.name]) for layer in model.layers if layer.name in copies]


def network_counts(dims: int = 3, channels: int = 1, num_outputs: int = 1, filters: int = 32, depth: int = 4,
                   spacing=None) -> NetworkCounts:
    """Builds the network at its smallest valid size under ``mixed_float16`` and counts it.

    The global dtype policy is restored afterwards; the weights are built on the CPU. The
    counts are remembered per architecture (building takes about a second).
    """
    return _network_counts(dims, channels, num_outputs, filters, depth, None if spacing is None else tuple(spacing))


@functools.lru_cache(maxsize=16)
def _network_counts(dims, channels, num_outputs, filters, depth, spacing) -> NetworkCounts:
    import keras

    from kerasunet.model import build_unet  # here: kerasunet.model imports this module

    factors = pooling_factors(pooling_plan((1.0,) * dims if spacing is None else spacing, depth))
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with keras.device("cpu"):
            model = build_unet((*factors, channels), num_outputs, filters=filters, depth=depth, dims=dims,
                               spacing=spacing)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    voxels, saved, half = math.prod(factors), 0, 0
    for layer, copies in saved_tensors(model):
        values = copies * math.prod(layer.output.shape[1:])
        saved += values
        # The input layer has no cast: it feeds float32 and the first conv casts it.
        half += values if layer.compute_dtype == "float16" and layer is not model.layers[0] else 0
    return NetworkCounts(factors, model.count_params(), sum(math.prod(w.shape) for w in model.trainable_weights),
                         saved / voxels, half / voxels)


def estimate_from_counts(counts: NetworkCounts, patch_size, batch_size: int, precision: str) -> MemoryEstimate:
    """The memory model of the module docstring for a patch of a counted network."""
    voxels = math.prod(patch_size) * batch_size
    if precision == "float32":
        activations = 4 * counts.saved_per_voxel * voxels
        weights = 4 * counts.weights
    else:
        half = counts.half_per_voxel
        activations = (2 * half + 4 * (counts.saved_per_voxel - half)) * voxels
        weights = 4 * counts.weights + 2 * counts.trainable
    return MemoryEstimate(tuple(patch_size), batch_size, precision, weights=weights,
                          gradients=4 * counts.trainable, optimizer=4 * ADAM_MOMENTS * counts.trainable,
                          activations=round(activations))


def check_plan_args(patch_size, batch_size: int, precision: str, counts: NetworkCounts, spacing, depth) -> None:
    """Checks the arguments of :func:`estimate_memory` that the network build does not."""
    from kerasunet.model import check_patch_size  # here: kerasunet.model imports this module

    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"Expected precision in {PRECISIONS}. Received: precision={precision!r}")
    if len(tuple(patch_size)) != len(counts.factors):
        raise ValueError(f"Expected a patch_size with {len(counts.factors)} sizes. "
                         f"Received: patch_size={tuple(patch_size)}")
    check_patch_size(tuple(patch_size), counts.factors,
                     (1.0,) * len(counts.factors) if spacing is None else spacing, depth)


def estimate_memory(patch_size, batch_size: int = 1, precision: str = "float32", channels: int = 1,
                    num_outputs: int = 1, filters: int = 32, depth: int = 4, spacing=None) -> MemoryEstimate:
    """Estimated peak memory of one training step of :func:`kerasunet.model.build_unet` with Adam.

    Args:
        patch_size: Spatial patch size, ``(D, H, W)`` (or ``(H, W)`` for the 2D network).
        batch_size: Patches per step.
        precision: ``"float32"`` or ``"mixed_float16"``.
        channels: Input channels.
        num_outputs: Output channels.
        filters: Channels of the first level.
        depth: Number of pooling levels.
        spacing: Voxel spacing in mm per axis (pooling plan), or None for isotropic.

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ValueError: an argument is out of range or the patch breaks the size rule.
    """
    counts = network_counts(len(tuple(patch_size)), channels, num_outputs, filters, depth, spacing)
    check_plan_args(patch_size, batch_size, precision, counts, spacing, depth)
    return estimate_from_counts(counts, patch_size, batch_size, precision)


def largest_fitting_patch(counts: NetworkCounts, patch_size, batch_size: int, precision: str, budget_gib: float):
    """The largest patch of the same shape as ``patch_size`` whose estimate fits the budget.

    Candidates are ``patch_size`` scaled by one factor ``s <= 1`` on every axis, each axis
    rounded down to a multiple of its pooling factor; the largest ``s`` that fits wins.

    Returns:
        ``(patch, estimate)``, or ``(None, None)`` when no patch of that shape fits.
    """
    scales = sorted({k * f / p for p, f in zip(patch_size, counts.factors) for k in range(1, p // f + 1)},
                    reverse=True)
    for s in scales:
        patch = tuple(math.floor(p * s / f + 1e-9) * f for p, f in zip(patch_size, counts.factors))
        if min(patch) < 1:
            break
        estimate = estimate_from_counts(counts, patch, batch_size, precision)
        if estimate.total <= budget_gib * GIB:
            return patch, estimate
    return None, None


def check_memory(patch_size, budget_gib: float, batch_size: int = 1, precision: str = "float32",
                 channels: int = 1, num_outputs: int = 1, filters: int = 32, depth: int = 4,
                 spacing=None) -> MemoryEstimate:
    """The estimate of :func:`estimate_memory`, refused in one line when it is over the budget.

    Args:
        patch_size: Spatial patch size, ``(D, H, W)``.
        budget_gib: Memory available for the step, in GiB.
        batch_size, precision, channels, num_outputs, filters, depth, spacing: As
            :func:`estimate_memory`.

    Returns:
        The :class:`MemoryEstimate` when it fits.

    Raises:
        MemoryBudgetError: over the budget; the message names the largest patch of the
            same shape that fits, or says that none does.
        ValueError: an argument is out of range.
    """
    if not budget_gib > 0:
        raise ValueError(f"Expected budget_gib > 0. Received: budget_gib={budget_gib}")
    counts = network_counts(len(tuple(patch_size)), channels, num_outputs, filters, depth, spacing)
    check_plan_args(patch_size, batch_size, precision, counts, spacing, depth)
    estimate = estimate_from_counts(counts, patch_size, batch_size, precision)
    if estimate.total <= budget_gib * GIB:
        return estimate
    patch, fit = largest_fitting_patch(counts, patch_size, batch_size, precision, budget_gib)
    advice = (f"the largest patch of that shape that fits is {format_size(patch)} ({fit.total_gib:.2f} GiB)"
              if patch else "no patch of that shape fits; lower the batch size, filters or depth")
    raise MemoryBudgetError(
        f"Expected a patch that fits the memory budget of {budget_gib:g} GiB. Received: "
        f"patch_size={format_size(patch_size)} (estimated {estimate.total_gib:.2f} GiB, {precision}, "
        f"batch {batch_size}); {advice}")


def padded_to_factors(size, factors) -> tuple[int, ...]:
    """``size`` rounded up per axis to a multiple of its pooling factor (whole-volume input)."""
    return tuple(-(-s // f) * f for s, f in zip(size, factors))


def research_setting(budget_gib: float = 12.0, batch_size: int = 1, volume=RESEARCH_VOLUME,
                     spacing=RESEARCH_SPACING, **arch) -> str:
    """Would the research's 3D U-Net on whole MRI volumes have fitted, and what patch does.

    The research's first experiment trained a 3D U-Net on whole 320×260×72 volumes and ran
    out of memory. This states the estimate for that setting (filters 32, depth 4, batch 1
    unless ``arch``/``batch_size`` say otherwise), in float32 and mixed precision, against a
    GPU of ``budget_gib``, and the largest patch of the volume's shape that fits.

    Args:
        budget_gib: GPU memory in GiB (12 for the research's GPU).
        batch_size: Volumes per step.
        volume: Volume size ``(D, H, W)``.
        spacing: Voxel spacing ``(D, H, W)`` in mm.
        **arch: Overrides of :data:`RESEARCH_ARCH` (filters, depth, channels, num_outputs).

    Returns:
        A few sentences for a report or a terminal.
    """
    arch = {**RESEARCH_ARCH, **arch}
    counts = network_counts(len(volume), arch["channels"], arch["num_outputs"], arch["filters"], arch["depth"],
                            spacing)
    whole = padded_to_factors(volume, counts.factors)
    lines = [f"A 3D U-Net (filters {arch['filters']}, depth {arch['depth']}, batch {batch_size}) on whole "
             f"{format_size(volume)} (D x H x W) volumes, padded to {format_size(whole)} for the pooling factors "
             f"{counts.factors} of spacing {tuple(spacing)} mm:"]
    for precision in PRECISIONS:
        estimate = estimate_from_counts(counts, whole, batch_size, precision)
        fits = estimate.total <= budget_gib * GIB
        verdict = "fits" if fits else "does not fit"
        line = f"  {precision}: estimated {estimate.total_gib:.2f} GiB, {verdict} in {budget_gib:g} GiB"
        if not fits:
            patch, fit = largest_fitting_patch(counts, whole, batch_size, precision, budget_gib)
            line += (f"; the largest patch of that shape that fits is {format_size(patch)} ({fit.total_gib:.2f} GiB)"
                     if patch else "; no patch of that shape fits")
        lines.append(line + ".")
    return "\n".join(lines)
