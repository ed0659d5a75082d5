r"""Minimal reproduction: XLA's CPU convolutions against PyTorch's, forward and both gradients, one op at a time.

Our CPU train step trails PyTorch eager while inference is on par; this isolates single convolutions at shapes
of our decoders and encoder (NHWC in JAX, NCHW in PyTorch, float32), so the gap can be shown without our code.

  PJRT_NPROC=2 taskset -c 0,1 python benchmarks/conv_cpu_repro.py --threads=2

Needs torch (`pip install -e '.[torch]'`). Give it idle cores: PyTorch's threads slow down badly on busy ones.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

# (batch, height, width, in channels, out channels, kernel, groups): U-shape decoder 3x3s, a 1x1 projection,
# a MobileNetV2 depthwise 3x3.
SHAPES = [(4, 64, 64, 64, 64, 3, 1), (4, 32, 32, 128, 64, 3, 1), (4, 32, 32, 144, 24, 1, 1),
          (4, 32, 32, 144, 144, 3, 144)]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def jax_times(shape, repeats: int) -> tuple[float, float, float]:
    batch, height, width, cin, cout, kernel, groups = shape
    x = jax.random.normal(jax.random.key(0), (batch, height, width, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin // groups, cout)) * 0.1
    pad = (kernel - 1) // 2

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)

    forward = jax.jit(conv)
    input_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=0))
    filter_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=1))
    # The gradients include one forward (to square the output): subtract it to get the backward convolution.
    fwd = median_ms(lambda: forward(x, w).block_until_ready(), repeats)
    return (fwd, median_ms(lambda: input_grad(x, w).block_until_ready(), repeats) - fwd,
            median_ms(lambda: filter_grad(x, w).block_until_ready(), repeats) - fwd)


def torch_times(shape, repeats: int) -> tuple[float, float, float]:
    import torch

    batch, height, width, cin, cout, kernel, groups = shape
    x = torch.randn(batch, cin, height, width)
    w = torch.randn(cout, cin // groups, kernel, kernel) * 0.1
    pad = (kernel - 1) // 2
    conv = lambda x, w: torch.nn.functional.conv2d(x, w, padding=pad, groups=groups)  # noqa: E731

    def gradient(wrt_input: bool):
        xs, ws = x.clone().requires_grad_(wrt_input), w.clone().requires_grad_(not wrt_input)
        (conv(xs, ws) ** 2).sum().backward()

    with torch.no_grad():
        fwd = median_ms(lambda: conv(x, w), repeats)
    return fwd, median_ms(lambda: gradient(True), repeats) - fwd, median_ms(lambda: gradient(False), repeats) - fwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (set PJRT_NPROC for XLA)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, {args.threads} threads")
    print("| batch,H,W,Cin->Cout, k, groups | forward ms jax / torch | input grad | filter grad |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        ours, theirs = jax_times(shape, args.repeats), torch_times(shape, args.repeats)
        cells = " | ".join(f"{a:.1f} / {b:.1f} ({a / b:.1f}x)" for a, b in zip(ours, theirs))
        print(f"| {shape[0]},{shape[1]},{shape[2]},{shape[3]}->{shape[4]}, {shape[5]}, {shape[6]} | {cells} |")


if __name__ == "__main__":
    main()
