"""Scoring a learned token: generation with the quantized pipeline, CLIP-T / CLIP-I / DINO (zoodip-eval) and
zoodip-generate."""
