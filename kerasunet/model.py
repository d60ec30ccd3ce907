"""The 2D and 3D U-Net with long and short skips, after Chlebus et al. 2018.

Chlebus G., Schenk A., Moltz J. H., van Ginneken B., Hahn H. K., Meine H.
"Automatic liver tumor segmentation in CT with fully convolutional neural
networks and object-based postprocessing", Scientific Reports 8, 15497 (2018).
This is the network the research report (Wang & Tang, "U-Net and Transfer
Learning Approaches to Liver Tumor Segmentation of MRI Images") pre-trains on
CT and transfers to MRI.

The model is built from block functions that return tensors. Every layer is
named ``<block>_<part>`` with block one of ``input``, ``encoder_{i}``,
``bottleneck``, ``decoder_{i}`` or ``head``, so freezing and weight transfer
select layers by name (:func:`block_of`, :func:`layers_in_blocks`). The 3D
network (``dims=3``) is built from the same blocks, which read the number of
spatial axes from their input tensor, so it has the same layer names.

Importing this module also registers kerasunet's losses and metrics, so a
compiled model file (a training checkpoint) loads with ``safe_mode=True``.
"""

from __future__ import annotations

import re

import keras
from keras import layers

import kerasunet.losses  # noqa: F401  registers the losses as Keras serializable
import kerasunet.metrics  # noqa: F401  registers the metrics as Keras serializable
from kerasunet.planner import pooling_factors, pooling_plan

# PyTorch's default BatchNorm momentum (0.1 there, 1 - 0.9 here). Keras's 0.99 makes the moving
# statistics lag for hundreds of steps, so on small medical sets (a few hundred slices per
# epoch) validation and inference in the first epochs use stale statistics.
BN_MOMENTUM = 0.9

BLOCK_PATTERN = re.compile(r"^(input|encoder_\d+|bottleneck|decoder_\d+|head)_")

# Layer classes by number of spatial axes; a block picks them from its input's rank.
CONV = {2: layers.Conv2D, 3: layers.Conv3D}
CONV_TRANSPOSE = {2: layers.Conv2DTranspose, 3: layers.Conv3DTranspose}
MAX_POOL = {2: layers.MaxPooling2D, 3: layers.MaxPooling3D}
AXES = {2: ("H", "W"), 3: ("D", "H", "W")}


def spatial_dims(x) -> int:
    """Number of spatial axes of a ``[B, *spatial, C]`` tensor (2 or 3)."""
    return len(x.shape) - 2


def check_input_size(height, width, depth: int) -> None:
    """Checks that an image size fits a U-Net of this depth.

    Each encoder level halves the size with a 2×2 max-pool and each decoder
    level doubles it again, so height and width must be multiples of
    ``2**depth``. ``None`` (size known only at call time) passes.

    Args:
        height: Image height in pixels, or None.
        width: Image width in pixels, or None.
        depth: Number of encoder levels (pooling steps).

    Raises:
        ValueError: height or width is not a positive multiple of ``2**depth``.
    """
    step = 2**depth
    if any(s is not None and (s < step or s % step) for s in (height, width)):
        raise ValueError(
            f"Expected height and width to be positive multiples of 2**depth={step} "
            f"(depth={depth}). Received: height={height}, width={width}"
        )


def check_patch_size(size, factors, spacing, depth: int) -> None:
    """Checks that a (patch) size fits a U-Net whose pooling is planned per axis.

    Each axis must be a positive multiple of its total pooling factor (the
    product over levels of :func:`kerasunet.planner.pooling_plan`). ``None``
    sizes (known only at call time) pass.

    Args:
        size: Spatial size, ``(D, H, W)`` in 3D; entries may be None.
        factors: Total pooling factor per axis, e.g. ``(8, 16, 16)``.
        spacing: The voxel spacing the factors were planned from (for the message).
        depth: Number of encoder levels (for the message).

    Raises:
        ValueError: an axis is not a positive multiple of its factor.
    """
    if any(s is not None and (s < f or s % f) for s, f in zip(size, factors)):
        axes = ", ".join(AXES[len(size)])
        raise ValueError(
            f"Expected sizes ({axes}) that are positive multiples of the pooling factors "
            f"{tuple(factors)} (spacing={tuple(spacing)}, depth={depth}). Received: size={tuple(size)}"
        )


def block_of(layer_name: str) -> str:
    """The block a layer belongs to, e.g. ``"encoder_2"`` for ``"encoder_2_conv_a"``.

    Raises:
        ValueError: the name carries no kerasunet block prefix.
    """
    match = BLOCK_PATTERN.match(layer_name)
    if match is None:
        raise ValueError(
            "Expected a layer name starting with input_, encoder_{i}_, bottleneck_, "
            f"decoder_{{i}}_ or head_. Received: layer_name={layer_name!r}"
        )
    return match.group(1)


def layers_in_blocks(model: keras.Model, blocks) -> list:
    """The layers of ``model`` whose block (see :func:`block_of`) is in ``blocks``.

    Raises:
        ValueError: a requested block has no layer in the model (e.g. ``encoder_5``
            in a depth-4 model).
    """
    blocks = set(blocks)
    selected = [layer for layer in model.layers if block_of(layer.name) in blocks]
    missing = sorted(blocks - {block_of(layer.name) for layer in selected})
    if missing:
        raise ValueError(f"Expected blocks present in model {model.name!r}. Received: blocks={missing}")
    return selected


def conv_bn_relu(x, filters: int, name: str, suffix: str, initializer, dropout: float = 0.0):
    """[Dropout] → 3×3 (3×3×3) conv → BatchNorm → ReLU, layers named ``{name}_{part}_{suffix}``.

    The conv has no bias: BatchNorm's beta takes its place. 2D or 3D follows the
    rank of ``x``.
    """
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout_{suffix}")(x)
    x = CONV[spatial_dims(x)](filters, 3, padding="same", use_bias=False,
                              kernel_initializer=initializer, name=f"{name}_conv_{suffix}")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn_{suffix}")(x)
    return layers.ReLU(name=f"{name}_relu_{suffix}")(x)


def residual_block(x, filters: int, name: str, initializer, dropout: float = 0.0):
    """Two conv-BN-ReLU units with a short (residual) skip around them.

    The skip is added after the second BatchNorm and *before* the last ReLU, as
    in ResNet v1 (``{name}_add`` then ``{name}_relu_b``). Where the input has a
    different channel count, a 1×1 conv ``{name}_proj`` projects the skip.
    ``dropout`` > 0 puts a Dropout before each of the two convs (decoder path).
    """
    conv = CONV[spatial_dims(x)]
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = conv(filters, 1, kernel_initializer=initializer, name=f"{name}_proj")(x)
    x = conv_bn_relu(x, filters, name, "a", initializer, dropout)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout_b")(x)
    x = conv(filters, 3, padding="same", use_bias=False,
             kernel_initializer=initializer, name=f"{name}_conv_b")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn_b")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_relu_b")(x)


def decoder_block(x, skip, filters: int, name: str, initializer, dropout: float, strides=2):
    """Transposed conv ``{name}_up``, concat with the encoder's features (long
    skip) ``{name}_concat``, then a residual block with dropout.

    The transposed conv's ``strides`` mirror the encoder pool of this level per
    axis (1 where that axis was not pooled). Its kernel is 2 on every axis
    whatever the strides, so the weight shapes do not depend on the voxel
    spacing and a model planned for one spacing transfers to another.
    """
    x = CONV_TRANSPOSE[spatial_dims(x)](filters, 2, strides=strides, padding="same",
                                        kernel_initializer=initializer, name=f"{name}_up")(x)
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return residual_block(x, filters, name, initializer, dropout)


def check_args(input_shape, num_outputs: int, filters: int, depth: int, dropout: float, dims: int,
               spacing=None) -> None:
    """Checks :func:`build_unet` arguments except sizes; messages say what was expected and received."""
    if dims not in CONV:
        raise ValueError(f"Expected dims in {tuple(CONV)}. Received: dims={dims!r}")
    if len(tuple(input_shape)) != dims + 1:
        names = "(height, width, channels)" if dims == 2 else "(D, H, W, channels)"
        raise ValueError(f"Expected input_shape with {dims + 1} dims {names}. "
                         f"Received: input_shape={tuple(input_shape)}")
    if input_shape[-1] is None or input_shape[-1] < 1:
        raise ValueError(f"Expected a channel count >= 1 in input_shape. Received: input_shape={tuple(input_shape)}")
    if num_outputs < 1:
        raise ValueError(f"Expected num_outputs >= 1. Received: num_outputs={num_outputs}")
    if filters < 1:
        raise ValueError(f"Expected filters >= 1. Received: filters={filters}")
    if depth < 1:
        raise ValueError(f"Expected depth >= 1. Received: depth={depth}")
    if not 0 <= dropout < 1:
        raise ValueError(f"Expected 0 <= dropout < 1. Received: dropout={dropout}")
    if spacing is not None and len(tuple(spacing)) != dims:
        axes = ", ".join(AXES[dims])
        raise ValueError(f"Expected spacing with {dims} values ({axes}) in mm. Received: spacing={tuple(spacing)}")


def build_unet(input_shape=(None, None, 1), num_outputs: int = 1, filters: int = 32, depth: int = 4,
               dropout: float = 0.5, kernel_initializer="glorot_normal", name: str = "unet",
               dims: int = 2, spacing=None) -> keras.Model:
    """Builds the 2D or 3D U-Net of Chlebus et al. 2018 (Sci. Rep. 8:15497).

    Encoder level ``i`` (1..depth) is a residual block of ``filters * 2**(i-1)``
    channels followed by a max-pool; the bottleneck has ``filters * 2**depth``.
    Decoder level ``i`` upsamples with a transposed conv, concatenates encoder
    level ``i`` (long skip) and runs a residual block with Dropout before each
    conv. Every block is [3×3 conv + BatchNorm + ReLU] ×2 (3×3×3 in 3D) with a
    short skip added before the last ReLU (1×1 projection where channels
    differ). The head is a 1×1 conv and a float32 sigmoid, so under
    ``mixed_float16`` the convs compute in float16 and the output is float32.

    Pooling is planned per axis from ``spacing`` as nnU-Net's planner does
    (:func:`kerasunet.planner.pooling_plan`): at each level an axis is pooled by
    2 only while its spacing is at most twice the finest, and the spacing of
    pooled axes doubles. Thick MRI slices, spacing ``(3.0, 1.2, 1.2)`` in
    ``(D, H, W)``, pool ``(1, 2, 2)`` first and ``(2, 2, 2)`` after, so z is not
    halved before the in-plane axes have caught up. Each decoder level's
    transposed conv uses the same strides as the pool it mirrors. Without
    ``spacing`` every axis is pooled at every level (the 2D network).

    Axis order: 3D inputs are ``[B, D, H, W, C]``, D the slice (z) axis and H, W
    the axes of each slice in the order of the 2D network's slices; ``spacing``
    is in mm in the same ``(D, H, W)`` order (see :mod:`kerasunet.planner`).

    Input-size rule: each spatial axis must be a multiple of its total pooling
    factor, 2 to the number of levels that pool it: ``2**depth`` for height and
    width in 2D (16 for depth 4), ``(8, 16, 16)`` for ``(D, H, W)`` at depth 4
    and spacing ``(3.0, 1.2, 1.2)``. ``None`` sizes are allowed; any multiple
    then works.

    Args:
        input_shape: ``(height, width, channels)`` for ``dims=2``, ``(D, H, W,
            channels)`` for ``dims=3``; spatial sizes may be None.
        num_outputs: Sigmoid output channels (2 for CT liver+tumour, 1 for MRI tumour).
        filters: Channels of the first level; doubled at each level down.
        depth: Number of pooling steps.
        dropout: Rate of the Dropout before each decoder conv (0.5 in the research).
        kernel_initializer: Conv kernel initializer; Glorot normal as the research's model A.
        name: Model name.
        dims: Number of spatial axes, 2 or 3.
        spacing: Voxel spacing in mm per spatial axis, or None for isotropic.

    Returns:
        A functional ``keras.Model`` mapping ``[B, *spatial, C]`` to sigmoid
        probabilities ``[B, *spatial, num_outputs]``.

    Raises:
        ValueError: an argument is out of range or a static size breaks the rule.
    """
    check_args(input_shape, num_outputs, filters, depth, dropout, dims, spacing)
    plan = pooling_plan((1.0,) * dims if spacing is None else spacing, depth)
    planned = (1.0,) * dims if spacing is None else tuple(float(s) for s in spacing)
    if dims == 2 and spacing is None:
        check_input_size(input_shape[0], input_shape[1], depth)
    else:
        check_patch_size(tuple(input_shape[:-1]), pooling_factors(plan), planned, depth)
    initializer = keras.initializers.get(kernel_initializer)
    inputs = keras.Input(shape=tuple(input_shape), name="input_image")
    x, skips = inputs, []
    for i, pool in enumerate(plan, start=1):
        x = residual_block(x, filters * 2 ** (i - 1), f"encoder_{i}", initializer)
        skips.append(x)
        x = MAX_POOL[dims](pool, name=f"encoder_{i}_pool")(x)
    x = residual_block(x, filters * 2**depth, "bottleneck", initializer)
    for i in range(depth, 0, -1):
        x = decoder_block(x, skips[i - 1], filters * 2 ** (i - 1), f"decoder_{i}", initializer, dropout,
                          strides=plan[i - 1])
    x = CONV[dims](num_outputs, 1, kernel_initializer=initializer, name="head_conv")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="head_sigmoid")(x)
    return keras.Model(inputs, outputs, name=name)
