"""Tests of kerasunet.planner: pooling plan from spacing, memory estimate, budget refusal."""

import math
import re

import keras
import pytest

from kerasunet.model import build_unet
from kerasunet.planner import (GIB, MemoryBudgetError, check_memory, estimate_from_counts, estimate_memory,
                               network_counts, pooling_factors, pooling_plan, research_setting)

MRI = (3.0, 1.2, 1.2)  # (D, H, W) mm: thick slices


@pytest.mark.parametrize("spacing, depth, plan", [
    # The research's MRI: z waits one level, then every axis pools; z is halved 3 times, not 4.
    (MRI, 4, ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))),
    ((5.0, 0.8, 0.8), 4, ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))),
    ((1.0, 1.0, 1.0), 3, ((2, 2, 2),) * 3),
    ((2.0, 1.0, 1.0), 2, ((2, 2, 2),) * 2),  # at most twice the finest: pooled
    ((2.1, 1.0, 1.0), 2, ((1, 2, 2), (2, 2, 2))),
    ((0.7, 0.7, 4.0), 4, ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))),
    ((0.8, 0.8), 3, ((2, 2),) * 3),
])
def test_pooling_plan(spacing, depth, plan):
    assert pooling_plan(spacing, depth) == plan


def test_pooling_factors():
    assert pooling_factors(pooling_plan(MRI, 4)) == (8, 16, 16)
    assert pooling_factors(pooling_plan((5.0, 0.8, 0.8), 4)) == (4, 16, 16)


@pytest.mark.parametrize("spacing, depth, message", [
    ((3.0, -1.0, 1.0), 2, "Expected spacing of positive numbers in mm. Received: spacing=(3.0, -1.0, 1.0)"),
    ((3.0, float("nan"), 1.0), 2, "Expected spacing of positive numbers in mm. Received: spacing=(3.0, nan, 1.0)"),
    ((), 2, "Expected spacing of positive numbers in mm. Received: spacing=()"),
    (MRI, 0, "Expected depth >= 1. Received: depth=0"),
])
def test_pooling_plan_errors(spacing, depth, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        pooling_plan(spacing, depth)


def test_activations_counted_by_hand():
    # 2D, depth 1, filters F=4, per pixel of a 16x16 patch, kept for the backward pass:
    # input 1; encoder conv_a, relu_a, conv_b, relu_b 4F; pool F/4; bottleneck (2F channels at 1/4)
    # conv/relu a, b 2F; concat 2F; dropout_a 2 x 2F (scaled input and mask); decoder conv/relu a, b 4F;
    # dropout_b 2F; sigmoid 1. BatchNorm, Add, projection and up-conv outputs are freed.
    per_pixel = 2 + (4 + 0.25 + 2 + 2 + 4 + 4 + 2) * 4
    estimate = estimate_memory((16, 16), 1, filters=4, depth=1)
    assert estimate.activations == 4 * per_pixel * 16 * 16


def test_weights_gradients_and_adam_from_the_model():
    model = build_unet((8, 16, 16, 2), 3, filters=4, depth=2, dims=3, spacing=MRI)
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    estimate = estimate_memory((8, 16, 16), 1, channels=2, num_outputs=3, filters=4, depth=2, spacing=MRI)
    assert estimate.weights == 4 * model.count_params()
    assert estimate.gradients == 4 * trainable
    assert estimate.optimizer == 2 * 4 * trainable
    assert estimate.total == estimate.weights + estimate.gradients + estimate.optimizer + estimate.activations


def test_activations_scale_with_voxels_and_batch():
    arch = {"filters": 4, "depth": 2, "spacing": MRI}
    one = estimate_memory((8, 16, 16), 1, **arch)
    assert estimate_memory((8, 32, 16), 1, **arch).activations == 2 * one.activations
    assert estimate_memory((8, 16, 16), 3, **arch).activations == 3 * one.activations
    assert estimate_memory((8, 16, 16), 3, **arch).weights == one.weights


def test_mixed_precision_halves_activations_and_restores_policy():
    counts = network_counts(3, 1, 1, 4, 2, MRI)
    assert 0 < counts.half_per_voxel < counts.saved_per_voxel
    full = estimate_memory((8, 16, 16), 2, filters=4, depth=2, spacing=MRI)
    mixed = estimate_memory((8, 16, 16), 2, "mixed_float16", filters=4, depth=2, spacing=MRI)
    # float16 everywhere but the input and the sigmoid head (one channel each).
    assert mixed.activations == (2 * counts.saved_per_voxel + 2 * 2) * 8 * 16 * 16 * 2
    assert mixed.weights == full.weights + full.gradients // 2  # a float16 copy of each trainable weight
    assert keras.mixed_precision.global_policy().name == "float32"


def test_refuses_a_patch_over_budget_naming_the_largest_that_fits():
    arch = {"filters": 8, "depth": 3, "spacing": MRI}  # pooling factors (4, 8, 8)
    counts = network_counts(3, 1, 1, **arch)
    estimate = estimate_from_counts(counts, (64, 256, 256), 1, "float32")
    fit = estimate_from_counts(counts, (52, 216, 216), 1, "float32")
    # 56x224x224 is the next larger patch of that shape (multiples of the pooling factors).
    assert fit.total <= 2 * GIB < estimate_from_counts(counts, (56, 224, 224), 1, "float32").total
    message = ("Expected a patch that fits the memory budget of 2 GiB. Received: patch_size=64x256x256 "
               f"(estimated {estimate.total_gib:.2f} GiB, float32, batch 1); the largest patch of that shape "
               f"that fits is 52x216x216 ({fit.total_gib:.2f} GiB)")
    with pytest.raises(MemoryBudgetError, match=f"^{re.escape(message)}$"):
        check_memory((64, 256, 256), 2, 1, **arch)
    assert check_memory((52, 216, 216), 2, 1, **arch) == fit


def test_refuses_when_no_patch_of_that_shape_fits():
    with pytest.raises(MemoryBudgetError, match=re.escape("); no patch of that shape fits; lower the batch size, "
                                                          "filters or depth")):
        check_memory((8, 16, 16), 1e-5, 1, filters=8, depth=2, spacing=MRI)


@pytest.mark.parametrize("args, kwargs, message", [
    (((9, 16, 16),), {}, "Expected sizes (D, H, W) that are positive multiples of the pooling factors (2, 4, 4) "
                         "(spacing=(3.0, 1.2, 1.2), depth=2). Received: size=(9, 16, 16)"),
    (((8, 16, 16), 0), {}, "Expected batch_size >= 1. Received: batch_size=0"),
    (((8, 16, 16), 1, "float16"), {}, "Expected precision in ('float32', 'mixed_float16'). "
                                      "Received: precision='float16'"),
])
def test_estimate_argument_checks(args, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        estimate_memory(*args, filters=2, depth=2, spacing=MRI, **kwargs)


def test_research_setting_on_12_gib():
    text = research_setting(12)
    assert text.startswith("A 3D U-Net (filters 32, depth 4, batch 1) on whole 72x320x260 (D x H x W) volumes, "
                           "padded to 72x320x272 for the pooling factors (8, 16, 16)")
    lines = text.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["float32", "mixed_float16"]
    counts = network_counts(3, 1, 1, 32, 4, MRI)
    # In float32, as the research trained, the whole volume does not fit: it ran out of memory.
    assert estimate_from_counts(counts, (72, 320, 272), 1, "float32").total > 12 * GIB
    for line, precision in zip(lines[1:], ("float32", "mixed_float16")):
        whole = estimate_from_counts(counts, (72, 320, 272), 1, precision)
        assert f"estimated {whole.total_gib:.2f} GiB" in line
        if whole.total > 12 * GIB:
            assert "does not fit in 12 GiB" in line
            patch = tuple(int(s) for s in re.search(r"fits is (\d+)x(\d+)x(\d+)", line).groups())
            assert all(p % f == 0 for p, f in zip(patch, counts.factors))
            assert estimate_from_counts(counts, patch, 1, precision).total <= 12 * GIB
        else:
            assert line.endswith(", fits in 12 GiB.")
