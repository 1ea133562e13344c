"""python -m zoodip.tools.bench_kernels: INT8 Linear kernels on this CPU, on the SD1.5 UNet's layer shapes.

Prints one table: milliseconds per call (median of --repeats) for quanto's bf16 path
(torch._weight_int8pack_mm), zoodip's dequantize-into-a-buffer + bf16 GEMM (`use_fast_cpu_int8`), and an
unquantized bf16 GEMM, at batch 1 and 3 (RGE n=2 batched). The evidence behind INT8PACK_MAX_ROWS.
Then a second table at batch 1: quanto's INT4 kernel (torch._weight_int4pack_mm on its packed layout),
quanto's dequantization of that layout, and the bf16 GEMM: why INT4 keeps quanto's kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zoodip.models.quantize import dequantize_into_workspace, quantize_weights, use_fast_cpu_int8

# (tokens, in_features, out_features): self-attention at 64x64, 32x32, 16x16 latents; GEGLU in and out;
# cross-attention keys/values over the 77 prompt tokens.
SHAPES = [
    (4096, 320, 320),
    (4096, 320, 2560),
    (4096, 1280, 320),
    (1024, 640, 640),
    (1024, 640, 5120),
    (256, 1280, 1280),
    (256, 1280, 10240),
    (256, 5120, 1280),
    (77, 768, 320),
    (77, 768, 1280),
]


def median_ms(repeats: int, fn, *inputs) -> float:
    fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def dequantized_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_into_workspace(layer.weight, x.dtype), layer.bias)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoodip.tools.bench_kernels", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| batch | tokens | in | out | int8pack_mm ms | dequant + GEMM ms | bf16 GEMM ms | int8pack / dequant |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode(False):  # layers built outside inference mode, as training builds them
        layers = {}
        for _, k, n in SHAPES:
            layer = torch.nn.Sequential(torch.nn.Linear(k, n)).bfloat16()
            quantize_weights(layer, "int8")
            use_fast_cpu_int8(layer)
            layers[k, n] = (layer[0], torch.nn.Linear(k, n).bfloat16())
    with torch.inference_mode():
        for batch in (1, 3):
            for tokens, k, n in SHAPES:
                x = torch.randn(batch * tokens, k, dtype=torch.bfloat16)
                int8, bf16 = layers[k, n]
                pack = median_ms(args.repeats, int8._quanto_forward, x)
                deq = median_ms(args.repeats, dequantized_linear, int8, x)
                gemm = median_ms(args.repeats, bf16, x)
                print(f"| {batch} | {tokens} | {k} | {n} | {pack:.1f} | {deq:.1f} | {gemm:.1f} | {pack / deq:.2f}x |")
    print("\n| tokens | in | out | int4pack_mm ms | INT4 dequantize ms | bf16 GEMM ms | int4pack / bf16 |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():  # INT4 cannot run under inference_mode (zoodip.models.quantize.forward_mode)
        for tokens, k, n in SHAPES:
            int4 = torch.nn.Sequential(torch.nn.Linear(k, n)).bfloat16()
            quantize_weights(int4, "int4")
            x = torch.randn(tokens, k, dtype=torch.bfloat16)
            pack = median_ms(args.repeats, int4, x)
            deq = median_ms(args.repeats, int4[0].weight.dequantize)
            gemm = median_ms(args.repeats, layers[k, n][1], x)
            print(f"| {tokens} | {k} | {n} | {pack:.1f} | {deq:.1f} | {gemm:.1f} | {pack / gemm:.2f}x |")


if __name__ == "__main__":
    main()
