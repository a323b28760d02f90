"""End-to-end demo on built-in synthetic data: unstitch -> small conv net -> stitch.

Run with ``python -m qlty_gpu.demo`` (or ``make demo``). It

1. makes a synthetic "microscopy" image batch (blobs and filaments) and a noisy copy;
2. checks the plain round trip ``stitch(unstitch(x)) == x``;
3. trains a tiny convolutional denoiser on the overlapping patches for a few seconds;
4. runs the denoiser patch-wise and stitches the outputs back with border down-weighting;
5. prints the errors and writes ``demo.png`` (noisy | clean | denoised) to ``--out``.

Everything runs on the CPU here, or on CUDA with ``--device cuda`` (Triton kernels).
"""

from __future__ import annotations

import argparse
import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from . import NCYXQuilt
from .ops.backend import choose_backend


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` float32 images in [0, 1]: Gaussian blobs plus thin filaments."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        img = torch.zeros(size, size)
        for _ in range(40):
            cy, cx = torch.rand(2, generator=g) * size
            r = 2 + 6 * torch.rand(1, generator=g)
            img += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        for _ in range(6):
            a, b, c = torch.randn(3, generator=g)
            d = (a * (xx - size / 2) + b * (yy - size / 2) + c * size / 4).abs()
            img += 0.6 * torch.exp(-(d**2) / (2 * 1.5**2 * (a**2 + b**2)))
        out[i, 0] = img / img.max()
    return out


class TinyDenoiser(torch.nn.Module):
    """Three 3x3 convolutions with a residual connection."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def write_png(path: Path, img: np.ndarray) -> None:
    """Write a greyscale uint8 image as PNG with the standard library only."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            len(data).to_bytes(4, "big")
            + tag
            + data
            + zlib.crc32(tag + data).to_bytes(4, "big")
        )

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlty_gpu.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_out", help="folder for demo.png")
    ap.add_argument("--size", type=int, default=200, help="image size (not a multiple of the step)")
    ap.add_argument("--steps", type=int, default=150, help="training steps")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)

    clean = synthetic_images(4, args.size).to(dev)
    noisy = (clean + 0.15 * torch.randn_like(clean)).clamp(0, 1)
    quilt = NCYXQuilt(Y=args.size, X=args.size, window=(48, 48), step=(24, 24), border=(6, 6),
                      border_weight=0.1)
    print(f"qlty_gpu demo: {quilt}")
    print(f"backend: unstitch={choose_backend('unstitch', dev, torch.float32)}, "
          f"stitch={choose_backend('stitch', dev, torch.float32)}")

    t0 = time.perf_counter()
    patches_in, patches_tgt = quilt.unstitch_data_pair(noisy, clean)
    back, norma = quilt.stitch(quilt.unstitch(noisy))
    rt_err = (back - noisy).abs().max().item()
    print(f"{patches_in.shape[0]} patches {tuple(patches_in.shape[1:])}; round-trip max |error| "
          f"= {rt_err:.2e} ({(time.perf_counter() - t0) * 1e3:.1f} ms)")

    model = TinyDenoiser().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    border = quilt.border_tensor().to(dev)  # train on patch interiors only
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, patches_in.shape[0], (32,), device=dev)
        pred = model(patches_in[idx])
        loss = (((pred - patches_tgt[idx]) ** 2) * border).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.5f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s")

    with torch.no_grad():
        denoised, _ = quilt.stitch(model(quilt.unstitch(noisy)))
    print(f"PSNR noisy vs clean    {psnr(noisy, clean):6.2f} dB")
    print(f"PSNR denoised vs clean {psnr(denoised.clamp(0, 1), clean):6.2f} dB")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    row = torch.cat([noisy[0, 0], clean[0, 0], denoised[0, 0].clamp(0, 1)], dim=1)
    write_png(out / "demo.png", (row.cpu().numpy() * 255).round().astype(np.uint8))
    print(f"wrote {out / 'demo.png'} (noisy | clean | denoised)")
    if rt_err > 1e-5:
        print("ERROR: round trip is not exact")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
