"""Training step of kerasunet's U-Net next to the same network in PyTorch, on this CPU (not a test).

``TorchUNet`` is ``kerasunet.model.build_unet`` layer for layer: residual blocks of two 3x3
conv (no bias) + BatchNorm + ReLU units with the skip added before the last ReLU (a 1x1
projection where channels differ), 2x2 max-pool down, 2x2 stride-2 transposed conv up,
concatenation with the encoder's features, Dropout before each decoder conv, 1x1 conv +
sigmoid head; Glorot-normal kernels, BatchNorm momentum 0.1 (Keras 0.9) and epsilon 1e-3.
The loss is BCE + soft Dice, as ``kerasunet.losses.get_loss("bce_dice")``.

In one run, for 128x128 (filters 16, batch 16) and 256x256 (filters 32, batch 8), depth 4:

* PyTorch, NCHW and channels-last, one in-memory batch, Adam, timed before and after
  kerasunet: the fastest group of ``--steps`` steps (as many groups each time as kerasunet has
  timed epochs, after two warm-up steps);
* kerasunet's own training loop (``kerasunet.train``) on records of CT phantoms, the rate
  ``benchmarks/train_step.py`` measures (fastest epoch of ``--steps`` steps after the first).

The last line is kerasunet's rate over the faster PyTorch layout. Needs ``torch`` (not a
kerasunet dependency); without it the script says it is skipped and exits 0, so ``make bench``
goes on. Usage::

    python benchmarks/peer_torch.py [--configs 128 256] [--steps 10] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# size: (filters, batch); depth 4 throughout
CONFIGS = {"128": (16, 16), "256": (32, 8)}
DEPTH = 4
OUTPUTS = 2  # CT: liver, tumour


def torch_unet(channels: int, outputs: int, filters: int, depth: int, dropout: float = 0.5):
    """The kerasunet U-Net as a ``torch.nn.Module`` (NCHW in, sigmoid probabilities out)."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, cin: int, cout: int, rate: float):
            super().__init__()
            self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
            self.drop_a, self.drop_b = nn.Dropout(rate), nn.Dropout(rate)
            self.conv_a, self.conv_b = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.Conv2d(
                cout, cout, 3, padding=1, bias=False)
            self.bn_a = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)
            self.bn_b = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)

        def forward(self, x):
            y = torch.relu(self.bn_a(self.conv_a(self.drop_a(x))))
            return torch.relu(self.bn_b(self.conv_b(self.drop_b(y))) + self.proj(x))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [filters * 2**i for i in range(depth)]
            self.encoders = nn.ModuleList(Residual(c, w, 0.0) for c, w in zip([channels] + widths[:-1], widths))
            self.bottleneck = Residual(widths[-1], filters * 2**depth, 0.0)
            self.ups = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in reversed(widths))
            self.decoders = nn.ModuleList(Residual(2 * w, w, dropout) for w in reversed(widths))
            self.head = nn.Conv2d(filters, outputs, 1)
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.xavier_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

        def forward(self, x):
            skips = []
            for encoder in self.encoders:
                x = encoder(x)
                skips.append(x)
                x = torch.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
                x = decoder(torch.cat([up(x), skip], 1))
            return torch.sigmoid(self.head(x).float())

    return UNet()


def bce_dice(pred, target, smooth: float = 1.0):
    """BCE + (1 - soft Dice per channel, averaged), the loss of ``get_loss("bce_dice")``."""
    import torch

    pred = pred.clamp(1e-7, 1 - 1e-7)
    bce = torch.nn.functional.binary_cross_entropy(pred, target)
    dims = (0, 2, 3)
    inter, total = (pred * target).sum(dims), (pred + target).sum(dims)
    return bce + 1 - ((2 * inter + smooth) / (total + smooth)).mean()


def batch_arrays(size: int, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One NCHW batch: random images and sparse multi-label targets (liver contains tumour)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, size, size), dtype=np.float32)
    liver = rng.random((batch, 1, size, size)) > 0.7
    tumour = liver & (rng.random((batch, 1, size, size)) > 0.8)
    return x, np.concatenate([liver, tumour], 1).astype(np.float32)


def torch_rate(size: int, filters: int, batch: int, steps: int, channels_last: bool, device: str = "cpu",
               autocast: str | None = None, warmup: int = 2, rounds: int = 1) -> dict:
    """Slices/s of ``steps`` Adam steps on one in-memory batch (after ``warmup`` steps), peak memory.

    Args:
        autocast: None (float32), ``"bf16"`` or ``"fp16"`` (with a gradient scaler).
        rounds: timed groups of ``steps`` steps; the fastest counts, as kerasunet's fastest epoch.
    """
    import torch

    torch.manual_seed(0)
    model = torch_unet(1, OUTPUTS, filters, DEPTH).to(device)
    x, y = (torch.from_numpy(a).to(device) for a in batch_arrays(size, batch))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    scaler = torch.amp.GradScaler(device, enabled=autocast == "fp16")
    cuda = device.startswith("cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            pred = model(x)
        loss = bce_dice(pred, y)  # float32 outside autocast: its binary_cross_entropy refuses half precision
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"slices_per_s": batch * steps / min(seconds), "peak_bytes": peak}


def kerasunet_loop_rate(size: int, filters: int, batch: int, steps: int, epochs: int) -> float:
    """kerasunet's training loop on CT phantom records, as ``benchmarks/train_step.py`` times it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import from_records, project_loop

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from_records(tmp, size, batch, steps)
        return project_loop(str(tmp / "records"), tmp, size, filters, batch, steps, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["128", "256"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per PyTorch run and per epoch")
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 timed kerasunet epoch")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:  # make bench runs every benchmark; this one is then skipped, not failed
        print("peer_torch.py skipped: PyTorch is not installed (pip install torch; kerasunet does not depend on it)")
        return
    steps, epochs = (4, 1) if args.quick else (args.steps, 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; depth {DEPTH}, Adam, bce_dice")
    ratios = []
    for key in args.configs:
        size, (filters, batch) = int(key), CONFIGS[key]
        # PyTorch before and after kerasunet, the faster of the two kept: a load that moves during the
        # run then weighs on both frameworks alike (PyTorch's threads suffer most from a busy CPU)
        nchw, last = (torch_rate(size, filters, batch, steps, channels_last=layout, rounds=epochs)["slices_per_s"]
                      for layout in (False, True))
        ours = kerasunet_loop_rate(size, filters, batch, steps, epochs)
        nchw, last = (max(rate, torch_rate(size, filters, batch, steps, channels_last=layout,
                                           rounds=epochs)["slices_per_s"])
                      for rate, layout in ((nchw, False), (last, True)))
        ratios.append(ours / max(nchw, last))
        print(f"{size}x{size} filters {filters} batch {batch}: PyTorch NCHW {nchw:.1f}, channels-last {last:.1f}, "
              f"kerasunet loop {ours:.1f} slices/s")
    print("kerasunet / best PyTorch layout: " + ", ".join(f"{k}²: {r:.2f}x" for k, r in zip(args.configs, ratios)))


if __name__ == "__main__":
    main()
