#!/usr/bin/env bash
# The equal-budget comparison on the toy world (RESULTS.md §5): estimators at an equal budget of UNet forward passes.
#   bash sweeps/toyworld_compare.sh [OUT_DIR] [STAGE ...]     (stages: screen main cosine lr; default all four)
# screen: every candidate (and SPSA without strata, the control of stratified SPSA) on two tuning subjects (the
#         first two good subjects of RESULTS.md §2's table that are not among the six), seeds 0 and 1, 2,500 forward
#         passes, against ZOODiP (RGE + SG) at the same budget.
# cosine: every method on one tuning subject and seed, 1,500 forward passes, logging the cosine of each estimate with
#         the exact gradient every 5 steps (train.grad_cosine_every; it loads a second, fp32, model: memory not comparable).
# main:   ZOODiP as the preset runs it (7,500 forward passes) and the screen's two best candidates, MAIN and MAIN2
#         (RESULTS.md §5 says why these), at 2,500, on the six subjects x 3 seeds; MAIN3, where set, the lr stage's.
# lr:     the screen's winner (RGE, SG off) with a higher constant lr, or a cosine-decayed lr, or n = 4 directions, on
#         the tuning subjects at 2,500 forward passes; ZOODiP (SG on) at the same budget, and with the cosine
#         schedule, as controls. Its best by final loss gap closed (the steadier measure) goes on to main as MAIN3.
# Each stage ends with zoodip-compare on its folder (alone on the machine: two threads).
# Jobs of one folder come from several multiruns (hydra.sweep.subdir keeps their job folders apart). Two jobs at a
# time, one thread each.
set -euo pipefail
OUT=${1:-outputs/results/compare}
shift || true
STAGES=${*:-screen main cosine lr}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
BIN=${BIN:-.venv/bin}
COMMON=(experiments=toyworld sweeps=compare_methods logger=none train.progress=false hydra/launcher=local_parallel
        hydra.launcher.n_jobs=2)
SIX='data.subject=red_circle,red_square,red_triangle,blue_star,red_heart,green_cross'
MAIN=${MAIN:-estimator=rge sg=off}
MAIN2=${MAIN2:-estimator=spsa sg=off puts.stratified=true}
MAIN3=${MAIN3:-}

train() {  # train NAME FOLDER ARGS...: one multirun into FOLDER, its job folders NAME_0, NAME_1, ...
  local name=$1 folder=$2
  shift 2
  local start
  start=$(date +%s)
  "$BIN/zoodip-train" "${COMMON[@]}" "$@" "hydra.sweep.dir=$folder" "hydra.sweep.subdir=${name}_\${hydra.job.num}" \
    >>"$folder.log" 2>&1
  echo "$folder $name: $(( $(date +%s) - start )) s" | tee -a "$OUT.times"
}

for stage in $STAGES; do
  REF='estimator=rge,sg=on'   # ZOODiP's label in zoodip-compare: the overrides that vary in the stage's folder
  case $stage in
    screen)
      F=$OUT/screen
      mkdir -p "$F"
      TUNE=(data.subject=green_circle,green_triangle train.seed=0,1)
      train zoodip "$F" "${TUNE[@]}" estimator=rge sg=on
      train sgoff "$F" "${TUNE[@]}" estimator=rge,antithetic,guided,hizoo,prgf sg=off
      train strat "$F" "${TUNE[@]}" estimator=spsa sg=off puts.stratified=true
      train spsa "$F" "${TUNE[@]}" estimator=spsa sg=off   # the control: what the strata alone do
      ;;
    lr)
      F=$OUT/lr
      REF='sg=on'   # every run of this stage is RGE
      mkdir -p "$F"
      TUNE=(data.subject=green_circle,green_triangle train.seed=0,1)
      train zoodip "$F" "${TUNE[@]}" estimator=rge sg=on
      train const "$F" "${TUNE[@]}" estimator=rge sg=off optimizer.lr=0.01,0.02
      train cosine "$F" "${TUNE[@]}" estimator=rge sg=off optimizer.schedule=cosine optimizer.lr=0.01,0.02,0.04
      train n4 "$F" "${TUNE[@]}" estimator=rge sg=off estimator.n=4 optimizer.schedule=cosine optimizer.lr=0.02
      train zcos "$F" "${TUNE[@]}" estimator=rge sg=on optimizer.schedule=cosine optimizer.lr=0.02
      # run after the lines above had shown every higher or decayed lr doing worse: the other side of lr 0.01
      train low "$F" "${TUNE[@]}" estimator=rge sg=off optimizer.lr=0.005,0.0071
      # and after lr 0.005 had closed the most of the gap: lower still
      train lower "$F" "${TUNE[@]}" estimator=rge sg=off optimizer.lr=0.0025,0.0035
      ;;
    cosine)
      F=$OUT/cosine
      mkdir -p "$F"
      ONE=(data.subject=green_circle train.seed=0 train.forward_budget=1500 train.keep_tokens_every=1500
           train.grad_cosine_every=5)
      train zoodip "$F" "${ONE[@]}" estimator=rge sg=on
      train sgoff "$F" "${ONE[@]}" estimator=rge,antithetic,guided,hizoo,prgf sg=off
      train strat "$F" "${ONE[@]}" estimator=spsa sg=off puts.stratified=true
      ;;
    main)
      F=$OUT/main
      mkdir -p "$F"
      train zoodip "$F" "$SIX" train.seed=0,1,2 estimator=rge sg=on train.forward_budget=7500 train.keep_tokens_every=1250
      # shellcheck disable=SC2086  # MAIN and MAIN2 hold several overrides each
      train fast "$F" "$SIX" train.seed=0,1,2 $MAIN train.keep_tokens_every=500
      # shellcheck disable=SC2086
      [ -z "$MAIN2" ] || train fast2 "$F" "$SIX" train.seed=0,1,2 $MAIN2 train.keep_tokens_every=500
      # shellcheck disable=SC2086
      [ -z "$MAIN3" ] || train fast3 "$F" "$SIX" train.seed=0,1,2 $MAIN3 train.keep_tokens_every=500
      ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  OMP_NUM_THREADS=2 "$BIN/zoodip-compare" "$F" "compare.reference='$REF'" >>"$F.log" 2>&1 || echo "$F: compare failed" | tee -a "$OUT.times"
  echo "$F compare: $(( $(date +%s) - start )) s" | tee -a "$OUT.times"
done
