"""The paper's method: Eq. 1's objective, the gradient estimators (Eq. 3 and the baselines), Subspace Gradient
(Algorithm 2, Eq. 5-7), PUTS timestep sampling (Eq. 8-9), and the training methods that put them together
(Algorithm 1's step: ZOODiP, first-order TI, GF-TI)."""
