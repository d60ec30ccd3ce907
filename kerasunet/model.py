"""The 2D U-Net with long and short skips, after Chlebus et al. 2018.

Chlebus G., Schenk A., Moltz J. H., van Ginneken B., Hahn H. K., Meine H.
"Automatic liver tumor segmentation in CT with fully convolutional neural
networks and object-based postprocessing", Scientific Reports 8, 15497 (2018).
This is the network the research report (Wang & Tang, "U-Net and Transfer
Learning Approaches to Liver Tumor Segmentation of MRI Images") pre-trains on
CT and transfers to MRI.

The model is built from block functions that return tensors. Every layer is
named ``<block>_<part>`` with block one of ``input``, ``encoder_{i}``,
``bottleneck``, ``decoder_{i}`` or ``head``, so freezing and weight transfer
select layers by name (:func:`block_of`, :func:`layers_in_blocks`).

Importing this module also registers kerasunet's losses and metrics, so a
compiled model file (a training checkpoint) loads with ``safe_mode=True``.
"""

from __future__ import annotations

import re

import keras
from keras import layers

import kerasunet.losses  # noqa: F401  registers the losses as Keras serializable
import kerasunet.metrics  # noqa: F401  registers the metrics as Keras serializable

# PyTorch's default BatchNorm momentum (0.1 there, 1 - 0.9 here). Keras's 0.99 makes the moving
# statistics lag for hundreds of steps, so on small medical sets (a few hundred slices per
# epoch) validation and inference in the first epochs use stale statistics.
BN_MOMENTUM = 0.9

BLOCK_PATTERN = re.compile(r"^(input|encoder_\d+|bottleneck|decoder_\d+|head)_")


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
    """[Dropout] → 3×3 conv → BatchNorm → ReLU, layers named ``{name}_{part}_{suffix}``.

    The conv has no bias: BatchNorm's beta takes its place.
    """
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout_{suffix}")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
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
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, kernel_initializer=initializer,
                                 name=f"{name}_proj")(x)
    x = conv_bn_relu(x, filters, name, "a", initializer, dropout)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout_b")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                      kernel_initializer=initializer, name=f"{name}_conv_b")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn_b")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_relu_b")(x)


def decoder_block(x, skip, filters: int, name: str, initializer, dropout: float):
    """2×2 transposed conv (stride 2) ``{name}_up``, concat with the encoder's
    features (long skip) ``{name}_concat``, then a residual block with dropout."""
    x = layers.Conv2DTranspose(filters, 2, strides=2, kernel_initializer=initializer,
                               name=f"{name}_up")(x)
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return residual_block(x, filters, name, initializer, dropout)


def check_args(input_shape, num_outputs: int, filters: int, depth: int, dropout: float) -> None:
    """Checks :func:`build_unet` arguments; messages say what was expected and received."""
    if len(tuple(input_shape)) != 3:
        raise ValueError("Expected input_shape with 3 dims (height, width, channels). "
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
    check_input_size(input_shape[0], input_shape[1], depth)


def build_unet(input_shape=(None, None, 1), num_outputs: int = 1, filters: int = 32, depth: int = 4,
               dropout: float = 0.5, kernel_initializer="glorot_normal", name: str = "unet") -> keras.Model:
    """Builds the 2D U-Net of Chlebus et al. 2018 (Sci. Rep. 8:15497).

    Encoder level ``i`` (1..depth) is a residual block of ``filters * 2**(i-1)``
    channels followed by a 2×2 max-pool; the bottleneck has ``filters * 2**depth``.
    Decoder level ``i`` upsamples with a 2×2 transposed conv, concatenates encoder
    level ``i`` (long skip) and runs a residual block with Dropout before each
    conv. Every block is [3×3 conv + BatchNorm + ReLU] ×2 with a short skip added
    before the last ReLU (1×1 projection where channels differ). The head is a
    1×1 conv and a float32 sigmoid, so under ``mixed_float16`` the convs compute
    in float16 and the output is float32.

    Input-size rule: height and width must be multiples of ``2**depth``
    (16 for depth 4). ``None`` sizes are allowed; any multiple then works.

    Args:
        input_shape: ``(height, width, channels)``; height/width may be None.
        num_outputs: Sigmoid output channels (2 for CT liver+tumour, 1 for MRI tumour).
        filters: Channels of the first level; doubled at each level down.
        depth: Number of pooling steps.
        dropout: Rate of the Dropout before each decoder conv (0.5 in the research).
        kernel_initializer: Conv kernel initializer; Glorot normal as the research's model A.
        name: Model name.

    Returns:
        A functional ``keras.Model`` mapping ``[B, H, W, C]`` to sigmoid
        probabilities ``[B, H, W, num_outputs]``.

    Raises:
        ValueError: an argument is out of range or a static size breaks the rule.
    """
    check_args(input_shape, num_outputs, filters, depth, dropout)
    initializer = keras.initializers.get(kernel_initializer)
    inputs = keras.Input(shape=tuple(input_shape), name="input_image")
    x, skips = inputs, []
    for i in range(1, depth + 1):
        x = residual_block(x, filters * 2 ** (i - 1), f"encoder_{i}", initializer)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"encoder_{i}_pool")(x)
    x = residual_block(x, filters * 2**depth, "bottleneck", initializer)
    for i in range(depth, 0, -1):
        x = decoder_block(x, skips[i - 1], filters * 2 ** (i - 1), f"decoder_{i}", initializer, dropout)
    x = layers.Conv2D(num_outputs, 1, kernel_initializer=initializer, name="head_conv")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="head_sigmoid")(x)
    return keras.Model(inputs, outputs, name=name)
