"""The toy world: a small diffusion model trained on coloured shapes, where the right token is known and a scorer
can tell whether the learned one is right (zoodip-make-toyworld, zoodip-demo)."""
