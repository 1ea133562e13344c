"""The training run around the method: the loop and its entry point (zoodip-train), checkpoints and exact resume,
preemption, the run lock, health checks and the W&B tracker."""
