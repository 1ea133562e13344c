"""Numerical health of a run: consecutive non-finite steps, and losses that diverge from their running median.

A non-finite step skips its update (the token keeps its last good value); `train.max_bad_steps` of them in a row
fail the run (0: never). A divergence is a sustained rise: the median of the last RECENT finite losses more than
DIVERGENCE_FACTOR times the median of the WINDOW finite losses before them. It starts an episode: one warning (log
and tracker) when it starts, none until the recent median is back under the bar. Single spikes are not divergence:
a one-sample loss swings by more than 10x across timesteps (the noise-prediction loss near t = 0 is many times its
value near t = 900), so under uniform timesteps (first-order TI) a healthy run would warn every few dozen steps.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable

WINDOW = 100  # finite losses in the reference median
RECENT = 10  # the latest finite losses, whose median must rise
MIN_HISTORY = 10  # no divergence verdict before this many finite losses precede the recent ones
DIVERGENCE_FACTOR = 10.0


class Health:
    def __init__(self, max_bad_steps: int, losses: Iterable[float] = ()) -> None:
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0
        self.diverging = False
        self.recent: deque[float] = deque((v for v in losses if math.isfinite(v)), maxlen=WINDOW + RECENT)

    def observe(self, loss: float) -> str | None:
        """Record one step's loss (NaN for a non-finite step); returns a warning when a divergence starts."""
        if not math.isfinite(loss):
            self.bad_in_a_row += 1
            return None
        self.bad_in_a_row = 0
        warning = None
        self.recent.append(loss)
        if len(self.recent) >= MIN_HISTORY + RECENT:
            losses = list(self.recent)
            before, latest = statistics.median(losses[:-RECENT]), statistics.median(losses[-RECENT:])
            above = before > 0 and latest > DIVERGENCE_FACTOR * before
            if above and not self.diverging:
                warning = (
                    f"the loss may be diverging: the median {latest:.4g} of the last {RECENT} finite losses is more "
                    f"than {DIVERGENCE_FACTOR:g}x the median {before:.4g} of the {len(losses) - RECENT} before them "
                    f"(try a lower optimizer.lr)"
                )
            self.diverging = above
        return warning

    @property
    def failed(self) -> str | None:
        """Why the run must stop, once max_bad_steps steps in a row were non-finite (0: never); else None."""
        if self.max_bad_steps and self.bad_in_a_row >= self.max_bad_steps:
            return (
                f"{self.bad_in_a_row} steps in a row had a non-finite loss (train.max_bad_steps={self.max_bad_steps}); "
                f"learned_embeds.safetensors holds the last good token"
            )
        return None
