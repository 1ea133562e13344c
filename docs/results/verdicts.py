"""RESULTS.md's summary: every verdict with its pairs, effect, 95% CI, p and the smallest effect the design detects.

    python docs/results/verdicts.py          # prints the summary table of RESULTS.md (and a check of each verdict)

Where the repository keeps the per-run values (docs/results/*/runs.csv, compare_main_final70_curves.csv), the pairs
are rebuilt and `zoodip.analysis.report.paired_summary` gives the mean difference, its 95% t interval, the paired
t-test's p and the detectable effect: (t_{0.975,n-1} + t_{0.8,n-1}) sd_diff / sqrt(n), the smallest mean difference a
two-sided paired t-test at alpha 0.05 finds with 80% power (exact t quantiles, not the normal 2.80).

Where only a section's reported numbers are kept (the older sections were computed from outputs/ folders that are
not), the same quantities come from them:
  T  the reported mean difference and paired t p give the t statistic, so se = |mean| / t_{1-p/2, n-1}; the interval
     and the detectable effect follow (as exact as the reported rounding: p to 2 significant digits);
  S  a mean and sd over runs against a fixed target (a one-sample t), or a paired difference whose sd is known
     because one arm is constant;
  B  only the two arms' sds are kept: sd_diff lies between |sd1 - sd2| and sd1 + sd2 whatever the pairing, so the
     interval and the detectable effect are given at their narrowest.
Verdict rule (as RESULTS.md states it): a direction only where the 95% interval excludes 0 (or the margin a section
stated); "equivalent" where it lies inside +/- 0.05; otherwise "inconclusive", with the detectable effect saying how
large a difference the design could have missed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import paper_budget as central_study  # beside this file: §3.2's record and its stated test
import puts_paper_budget  # beside this file: the PUTS study's record, read as its own analysis reads it
import sg_paper_budget  # likewise, the SG study's
import tuning_budget  # beside this file: the searches' record, likewise
from scipy import stats

from zoodip.analysis.report import paired_summary, paired_verdict

HERE = Path(__file__).resolve().parent
MARGIN = 0.05
# no verdict before one seed of every subject: a handful of pairs says little about the spread
FIRST_LOOK = sg_paper_budget.FIRST_LOOK


def quantiles(n: int) -> tuple[float, float]:
    return float(stats.t.ppf(0.975, n - 1)), float(stats.t.ppf(0.8, n - 1))


def from_se(mean: float, se: float, n: int, p: float | None = None) -> dict:
    ta, tp = quantiles(n)
    if p is None:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else 1.0
    return {"pairs": n, "mean": mean, "lo": mean - ta * se, "hi": mean + ta * se, "p": p, "mde": (ta + tp) * se}


def from_t(mean: float, p: float, n: int) -> dict:
    """T: the reported mean difference and paired t p of n pairs."""
    return from_se(mean, abs(mean) / float(stats.t.ppf(1 - p / 2, n - 1)), n, p)


def from_sd(mean: float, sd: float, n: int) -> dict:
    """S: a mean difference whose differences have sd `sd` over n runs or pairs."""
    return from_se(mean, sd / math.sqrt(n), n)


def recorded(mine, ref) -> dict:
    """R: pairs rebuilt from a per-run record."""
    return recorded_summary(paired_summary(mine, ref))


def rule(s: dict) -> str:
    """What the interval alone says, by the two-sided rule."""
    return paired_verdict(study_keys(s), MARGIN)


def wilson(p: float, n: int) -> tuple[float, float]:
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# ----------------------------------------------------------------------------- the records


def batched() -> pd.DataFrame:
    frame = pd.read_csv(HERE / "batched_presets" / "runs.csv")
    return frame.pivot_table(index=["subject", "seed"], columns="code", values="subject_accuracy").dropna()


def planned(text: str, pairs: int, design: int = 36) -> str:
    """A verdict or source of a study still short of its planned pairs says so (by default §3.2's 12 x 3)."""
    return text if pairs >= design else f"{text} (interim: {pairs} of {design} pairs)"


def study_keys(s: dict) -> dict:
    """This table's keys back as `paired_summary` names them, for the studies' own rules."""
    return {"pairs": s["pairs"], "ci_low": s["lo"], "ci_high": s["hi"]}


def study_verdict(s: dict | None, rule: Callable[[dict], str], pairs: int, design: int) -> str:
    """A study's own stated rule (its analysis script's `verdict`), once the study is past its first look."""
    if s is None:
        return f"in progress ({pairs} of {design} pairs)"
    return planned(rule(study_keys(s)), pairs, design)


def tuning_rows() -> list[tuple[str, str, str, str, dict, str]]:
    """§3.3: each method's tuning gain (best of its 20 trials - its preset, on the two tuning subjects)."""
    frame = pd.read_csv(tuning_budget.RECORD, dtype={"trial": str})
    checks = tuning_budget.held_out()
    # a gain above the margin is settled by the held-out check, once that has its planned pairs
    held = checks.get("tuned - preset ZOODiP", {"pairs": 0})
    settled = held["pairs"] >= tuning_budget.PLANNED
    above = "gain above the margin: check on held-out subjects"
    if settled:
        kept = held["verdict"] == "tuning helps"
        above = f"gain above the margin, {'kept' if kept else 'not kept'} on held-out subjects"
    out = []
    for _, s in tuning_budget.summary(frame).iterrows():
        verdict = "preset stands" if s.gain <= MARGIN else above
        stats_ = {"tuning": True, "mean": s.gain, "trials": s.trials}
        claim = f"An equal tuning budget finds no better {s.search.split(' (')[0]}"
        out.append((claim, "§3.3](#33-equal-tuning-budget", verdict, "best trial - preset", stats_, "R"))
    for label, sign in (("tuned - preset ZOODiP", "tuned - preset"), ("tuned ZOODiP - TI", "tuned ZOODiP - TI")):
        s = checks.get(label, {"pairs": 0})
        claim = "Tuned ZOODiP beats its preset (held out)" if "preset" in label else "Tuned ZOODiP reaches TI"
        if s["pairs"] < FIRST_LOOK:
            verdict = f"in progress ({s['pairs']} of {tuning_budget.PLANNED} pairs)"
            out.append((claim, "§3.3](#33-equal-tuning-budget", verdict, sign, None, "design stated"))
        else:
            as_claim = {
                "tuning helps": "holds",
                "tuning hurts": "does not hold (tuned lower)",
                "equivalent within ±0.05": "does not hold (equivalent within ±0.05)",
            }
            head, _, interim = s["verdict"].partition(" (interim")
            verdict = as_claim.get(head, head) + (f" (interim{interim}" if interim else "")
            out.append((claim, "§3.3](#33-equal-tuning-budget", verdict, sign, recorded_summary(s), "R"))
    return out


def recorded_summary(s: dict) -> dict:
    """`paired_summary`'s keys as this table names them."""
    return {
        "pairs": s["pairs"],
        "mean": s["mean_difference"],
        "lo": s["ci_low"],
        "hi": s["ci_high"],
        "p": s["t_test_p"],
        "mde": s["detectable_effect"],
    }


def table_s4() -> pd.DataFrame:
    frame = pd.read_csv(HERE / "tableS4_estimators" / "runs.csv")
    return frame.pivot_table(index=["subject", "seed"], columns="arm", values="subject_accuracy")


def finals70(metric: str) -> pd.DataFrame:
    """§5.5: each run's final token on 70 images (gap_closed on §5.2's pool), one column per method."""
    curves = pd.read_csv(HERE / "compare_main_final70_curves.csv")
    final = curves[curves["forward_passes"] > 0]
    return final.pivot_table(index=["subject", "seed"], columns="method", values=metric)


def prgf_main(metric: str) -> pd.DataFrame:
    """§5.6: History-PRGF (2,500 passes) and ZOODiP (7,500) rerun side by side, each final token on 70 images."""
    curves = pd.read_csv(HERE / "compare_prgf_main_curves.csv")
    final = curves[curves["forward_passes"] > 0]
    return final.pivot_table(index=["subject", "seed"], columns="method", values=metric)


def screen_finals(metric: str) -> pd.DataFrame:
    """§5.1: each screen run's final token (14 images; gap_closed on the screen's pool), one column per method."""
    curves = pd.read_csv(HERE / "compare_screen_curves.csv")
    final = curves.sort_values("forward_passes").groupby(["method", "subject", "seed"]).tail(1)
    return final.pivot_table(index=["subject", "seed"], columns="method", values=metric)


def cosine_steps(method: str) -> pd.DataFrame:
    """§5.3: the per-step cosines of one run's estimate (grad_cosine) and applied update (update_cosine)."""
    history = pd.read_csv(HERE / "compare_cosine_history.csv")
    return history[history["method"] == method].set_index("step")


def main_summary(method: str) -> pd.Series:
    frame = pd.read_csv(HERE / "compare_main_summary.csv")
    return frame.set_index("method").loc[method]


def acceptance() -> dict:
    text = (HERE / "toyworld_acceptance.txt").read_text(encoding="utf-8")
    return json.loads(text[: text.index("\n}\n") + 2])


# ----------------------------------------------------------------------------- the rows

ZOODIP, SG_OFF = "estimator=rge,sg=on", "estimator=rge,sg=off"
PRGF = "estimator=prgf,sg=off"
LOW_LR, SPSA = "estimator=rge,sg=off,optimizer.lr=0.0025", "estimator=spsa,sg=off,puts.stratified=True"


def rows() -> list[tuple[str, str, str, str, dict | None, str]]:
    """(claim, its section's link, verdict, the effect's sign convention, statistics or None, source)."""
    b, s4 = batched(), table_s4()
    acc70, gap70 = finals70("subject_accuracy"), finals70("gap_closed")
    fast, spsa = main_summary(SG_OFF), main_summary(SPSA)
    record = pd.read_csv(central_study.RECORD / "runs.csv")
    pb, q = central_study.pairs(record, "zoodip", "ti"), central_study.pairs(record, "zoodip", "zoodip_fp")
    cos = cosine_steps(ZOODIP)
    central, int8 = recorded(pb["zoodip"], pb["ti"]), recorded(q["zoodip"], q["zoodip_fp"])
    sg = sg_paper_budget.runs()
    off, t43 = sg_paper_budget.pairs(sg, "sg_off"), sg_paper_budget.pairs(sg, "sg_tau43")
    sg_off = recorded(off["sg_off"], off["sg_tau128"]) if len(off) >= FIRST_LOOK else None
    sg43 = recorded(t43["sg_tau43"], t43["sg_tau128"]) if len(t43) >= FIRST_LOOK else None
    pu = puts_paper_budget.pairs(puts_paper_budget.runs())
    puts = recorded(pu["puts"], pu["puts_uniform"]) if len(pu) >= FIRST_LOOK else None
    prgf, prgf_gap = prgf_main("subject_accuracy"), prgf_main("gap_closed")
    s3 = "3-presets-zoodip-and-first-order-ti-on-the-six-subjects"
    s41, s42, s45 = (
        "41-table-3-sg-x-puts",
        "42-table-s4-rge-spsa-one-point-n--2",
        "45-gf-ti-against-zoodip-and-ti-at-equal-forward-passes",
    )
    s43, s52 = (
        "43-table-s6-the-number-of-directions-n",
        "52-the-main-comparison-the-six-subjects-which-no-choice-was-made-on",
    )
    return [
        (
            "ZOODiP preset reaches >= 0.8",
            f"§3](#{s3}",
            "not met",
            "mean - 0.8",
            recorded(b["batched"], np.full(len(b), 0.8)),
            "R (§3.1's runs)",
        ),
        ("TI preset reaches >= 0.9", f"§3](#{s3}", "inconclusive", "mean - 0.9", from_sd(0.875 - 0.9, 0.114, 18), "S"),
        (
            "ZOODiP reaches TI (Table 1), presets",
            f"§3](#{s3}",
            "does not hold",
            "ZOODiP - TI",
            from_t(-0.117, 0.00022, 18),
            "T",
        ),
        (
            "The central claim at the paper's budget",
            "§3.2](#32-the-central-claim-at-the-papers-budget",
            planned(central_study.verdict(study_keys(central)), len(pb)),
            "ZOODiP - TI, margin 0.05",
            central,
            "R",
        ),
        (
            "INT8 costs ZOODiP nothing at the paper's budget",
            "§3.2](#32-the-central-claim-at-the-papers-budget",
            planned(rule(int8), len(q)),
            "INT8 - unquantized",
            int8,
            "R",
        ),
        *tuning_rows(),
        (
            "Batched step changes nothing",
            "§3.1](#31-the-same-preset-after-the-batched-step",
            "equivalent within ±0.05",
            "batched - sequential",
            recorded(b["batched"], b["baseline"]),
            "R",
        ),
        (
            "SG speeds up learning (Table 3)",
            f"§4.1](#{s41}",
            "inconclusive",
            "SG on - off",
            from_t(-0.140, 0.13, 12),
            "T",
        ),
        (
            "SG helps at the paper's budget",
            "§4.10](#410-subspace-gradient-at-the-papers-budget",
            study_verdict(sg_off, partial(sg_paper_budget.verdict, arm="sg_off"), len(off), sg_paper_budget.PLANNED),
            "SG off - tau 128",
            sg_off,
            "R" if sg_off else "design stated",
        ),
        (
            "tau scaled to the token's width",
            "§4.10](#410-subspace-gradient-at-the-papers-budget",
            study_verdict(sg43, partial(sg_paper_budget.verdict, arm="sg_tau43"), len(t43), sg_paper_budget.PLANNED),
            "tau 43 - tau 128",
            sg43,
            "R" if sg43 else "design stated",
        ),
        (
            "SG projects out > 80% (Fig. 8)",
            f"§4.1](#{s41}",
            "holds (descriptive)",
            "86% projected out",
            None,
            "no spread kept",
        ),
        (
            "PUTS beats uniform (Tables 3, 5)",
            f"§4.1](#{s41}",
            "inconclusive",
            "PUTS - uniform",
            from_t(0.143, 0.072, 12),
            "T",
        ),
        (
            "PUTS beats uniform at the paper's budget",
            "§4.11](#411-puts-at-the-papers-budget",
            study_verdict(puts, puts_paper_budget.verdict, len(pu), puts_paper_budget.PLANNED),
            "PUTS - uniform",
            puts,
            "R" if puts else "design stated",
        ),
        (
            "One-point performs poorly (Table S4)",
            f"§4.2](#{s42}",
            "holds",
            "one-point - RGE",
            recorded(s4["one_point"], s4["rge"]),
            "R",
        ),
        (
            "RGE beats SPSA (Table S4)",
            f"§4.2](#{s42}",
            "inconclusive",
            "SPSA - RGE",
            recorded(s4["spsa"], s4["rge"]),
            "R",
        ),
        ("n = 1 is worse (Table S6)", f"§4.3](#{s43}", "inconclusive", "n=1 - n=2", from_t(-0.257, 0.084, 3), "T"),
        ("n > 2 buys little (Table S6)", f"§4.3](#{s43}", "inconclusive", "n=4 - n=2", from_t(0.038, 0.46, 3), "T"),
        # PUTS scored 61/70 in all 6 runs, uniform 367/420 in the mean: the differences' sd is uniform's, 0.023.
        (
            "PUTS helps TI (Table S7)",
            "§4.4](#44-table-s7-puts-on-first-order-ti",
            "does not hold (equivalent within ±0.05)",
            "PUTS - uniform",
            from_sd(-1 / 420, 0.023, 6),
            "S",
        ),
        ("GF-TI fails (Table 1)", f"§4.5](#{s45}", "inconclusive", "GF-TI - ZOODiP", from_t(-0.010, 0.90, 3), "T"),
        (
            "ZOODiP reaches TI at equal passes",
            f"§4.5](#{s45}",
            "inconclusive",
            "ZOODiP - TI",
            from_t(-0.114, 0.12, 3),
            "T",
        ),
        (
            "Best T_L, T_U near the noise end (Fig. 7)",
            "§4.6](#46-fig-7-t_l-x-t_u",
            "inconclusive",
            "500-1000 - uniform",
            from_t(0.162, 0.22, 3),
            "T",
        ),
        (
            "Larger nu hurts at larger tau (Table 4)",
            "§4.7](#47-table-4-tau-x-nu-of-sg",
            "inconclusive",
            "nu 1e-1 - 1e-3",
            from_sd(0.795 - 0.843, abs(0.058 - 0.025), 3),
            "B",
        ),
        (
            "ZOODiP's accuracy at 1/3 of its passes (§5's goal)",
            "§5.5](#55-the-finals-on-70-images",
            "inconclusive (not shown)",
            "RGE no SG - ZOODiP",
            recorded(acc70[SG_OFF], acc70[ZOODIP]),
            "R",
        ),
        (
            "... and its loss gap closed",
            "§5.5](#55-the-finals-on-70-images",
            "lower",
            "gap closed, same",
            recorded(gap70[SG_OFF], gap70[ZOODIP]),
            "R",
        ),
        (
            "History-PRGF reaches ZOODiP at 1/3 of its passes",
            "§5.6](#56-history-prgf-in-the-main-comparison",
            "inconclusive at the margin (lower)",
            "PRGF - ZOODiP, margin 0.05",
            recorded(prgf[PRGF], prgf[ZOODIP]),
            "R",
        ),
        (
            "... and its loss gap closed",
            "§5.6](#56-history-prgf-in-the-main-comparison",
            "lower",
            "gap closed, same",
            recorded(prgf_gap[PRGF], prgf_gap[ZOODIP]),
            "R",
        ),
        (
            "SG off ahead at equal passes",
            f"§5.2](#{s52}",
            "inconclusive",
            "SG off - on",
            from_t(float(fast["equal_budget_minus_reference"]), float(fast["equal_budget_t_p"]), 18),
            "T",
        ),
        (
            "Stratified SPSA ties ZOODiP",
            f"§5.2](#{s52}",
            "inconclusive",
            "SPSA - ZOODiP",
            from_t(float(spsa["equal_budget_minus_reference"]), float(spsa["equal_budget_t_p"]), 18),
            "T",
        ),
        (
            "The screen's lr 0.0025 carries over",
            "§5.4](#54-learning-rate-schedule-and-directions",
            "inconclusive (no gain)",
            "lr 0.0025 - 0.01",
            recorded(acc70[LOW_LR], acc70[SG_OFF]),
            "R",
        ),
        (
            "SG turns the estimate from the gradient",
            "§5.3](#53-cosine-with-the-exact-gradient",
            "lower, within one run",
            "cos after - before",
            recorded(cos["update_cosine"], cos["grad_cosine"]),
            "R (1 run, steps)",
        ),
    ]


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def pval(p: float) -> str:
    return f"{p:#.2g}" if p >= 0.001 else f"{p:.1g}"


def main() -> None:
    acc = acceptance()["text_following"]
    print("| claim | verdict | effect (sign) | 95% CI | pairs | p | detectable | data |")
    print("|---|---|---|---|---|---|---|---|")
    lo, hi = wilson(acc["colour"], 216 * 64)
    print(
        f"| The world follows text [§1](#1-the-world-follows-text) | pass | {fmt(acc['colour'] - 0.99)} "
        f"(colour − 0.99, the closest) | [{fmt(lo - 0.99)}, {fmt(hi - 0.99)}] | 13,824 images | — | — | binomial |"
    )
    checks = []
    for claim, link, verdict, sign, s, source in rows():
        sign = sign.replace(" - ", " − ")
        head = f"| {claim} [{link}) | {verdict} |"
        if s is None:
            effect = "86%" if "%" in sign else "—"
            pairs = "84 refreshes" if "%" in sign else "—"
            sign = sign.replace("86% ", "")
            effect = f"{effect} ({sign})" if effect != "—" else sign
            print(f"{head} {effect} | — | {pairs} | — | — | {source} |")
            continue
        if s.get("tuning"):  # a search's best against its preset: no pairs, no test
            print(f"{head} {fmt(s['mean'])} ({sign}) | — | {s['trials']} trials x 2 subjects | — | — | {source} |")
            continue
        digits = 3 if s["mde"] < 0.2 else 2
        ci = f"[{fmt(s['lo'], digits)}, {fmt(s['hi'], digits)}]"
        p, mde = pval(s["p"]), f"{s['mde']:.{digits}f}"
        if source == "B":  # the narrowest the two sds allow
            ci, p, mde = "⊇ " + ci, "≥ " + p, "≥ " + mde
        # a one-sample t against a target; steps of one run
        pairs = f"{s['pairs']} runs" if "mean" in sign else f"{s['pairs']} steps" if "steps" in source else s["pairs"]
        print(f"{head} {fmt(s['mean'])} ({sign}) | {ci} | {pairs} | {p} | {mde} | {source} |")
        checks.append((claim[:60], verdict, rule(s)))
    print("\nrule check (the verdict as written, then what the interval alone says):")
    for claim, verdict, auto in checks:
        print(f"  {claim:60s}  {verdict:40s}  {auto}")
    hi_sd = 0.058 + 0.025
    widest = from_sd(0.795 - 0.843, hi_sd, 3)
    print(f"\nTable 4 at the widest sd ({hi_sd:.3f}): [{fmt(widest['lo'])}, {fmt(widest['hi'])}], {widest['mde']:.3f}")
    for label, (mean, p, n) in {
        "n=8 - n=2": (0.043, 0.37, 3),
        "500-1000 - 0-250": (0.367, 0.16, 3),
        "SG off - on, image_similarity (12)": (0.024, 0.11, 12),
        "PUTS - uniform, image_similarity (12)": (0.026, 0.042, 12),
        "PUTS - uniform on TI, image_similarity (6)": (0.007, 0.043, 6),
        "TI - ZOODiP, image_similarity (18)": (0.049, 2.5e-5, 18),
    }.items():
        s = from_t(mean, p, n)
        print(f"{label}: {fmt(mean)} [{fmt(s['lo'])}, {fmt(s['hi'])}], p {p}, detectable {s['mde']:.3f}")
    for label, frame in (("sequential", b := batched()), ("batched", b)):
        col = "baseline" if label == "sequential" else "batched"
        s = recorded(frame[col], np.full(len(frame), 0.8))
        print(f"ZOODiP preset {label} - 0.8: {fmt(s['mean'])} [{fmt(s['lo'])}, {fmt(s['hi'])}], p {s['p']:.2g}")
    s = from_sd(0.758 - 0.8, 0.091, 18)
    print(f"ZOODiP preset §3 (0.758 ± 0.091) - 0.8: [{fmt(s['lo'])}, {fmt(s['hi'])}], p {s['p']:.2g}")
    for label, metric in (("subject_accuracy", finals70("subject_accuracy")), ("gap_closed", finals70("gap_closed"))):
        for method in (LOW_LR, SPSA):
            s = recorded(metric[method], metric[ZOODIP])
            print(
                f"70 images, {label}, {method} - ZOODiP: {fmt(s['mean'])} [{fmt(s['lo'])}, {fmt(s['hi'])}], "
                f"p {s['p']:.2g}, detectable {s['mde']:.3f}"
            )
        s = recorded(metric[LOW_LR], metric[SG_OFF])
        print(
            f"70 images, {label}, lr 0.0025 - lr 0.01: {fmt(s['mean'])} [{fmt(s['lo'])}, {fmt(s['hi'])}], "
            f"p {s['p']:.2g}, detectable {s['mde']:.3f}"
        )
    for label in ("subject_accuracy", "gap_closed"):
        finals = screen_finals(label)
        for method in finals.columns.drop(ZOODIP):
            s = recorded(finals[method], finals[ZOODIP])
            print(
                f"screen, {label}, {method} - ZOODiP ({s['pairs']} pairs): {fmt(s['mean'])} "
                f"[{fmt(s['lo'])}, {fmt(s['hi'])}], p {s['p']:.2g}, detectable {s['mde']:.3f}"
            )


if __name__ == "__main__":
    main()
