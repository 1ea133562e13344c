"""Tools around the product: benchmarks (zoodip-bench), the GPU check (zoodip-gpu-check) and token export
(zoodip-export)."""
