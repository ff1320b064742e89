#!/usr/bin/env bash
# Adam CUDA-graph A/B on whatever H100 comes, stone_horse, results in $OUT. Two recipes:
#   short: reconstructed in 5k steps, 2500-step edits with the eager editor alternating graph/eager, then --overlap
#          (source .device/env.sh > /dev/null && LAST_START=235 bash scripts/adam_graph_ab.sh short; ~250 s)
#   full:  gpu_bench.sh prepare (GPU_TESTS=0; the optimizer-graph GPU tests beside it), then the default edit with the
#          packages on disk, eager Adam (main's default, with the reference-style views) and graphed (~640 s: use
#          RECON_STEPS=10000 to fit a call)
#   warm:  on a machine still holding gpu_bench.sh prepare's reconstruction, editor and packages: the optimizer-graph
#          GPU tests, then 2500-step edits with the packaged editor alternating graph/eager (LAST_START=480; ~60 s each)
cd "$(dirname "$0")/.."
# The packages' folder gpu_bench.sh uses (2026-12-07's sixth session ran the full recipe without it: its edit found no
# packages and ran eagerly)
export PYTHONPYCACHEPREFIX=/tmp/igs2gs-pycache PYTHONUNBUFFERED=1 IGS2GS_PACKAGE_DIR=$PWD/outputs/gpu_bench/packages
R=$OUT; W=outputs/gpu_bench; D=.device/data/stone_horse
nvidia-smi --query-gpu=name,persistence_mode --format=csv,noheader
lscpu | grep -E 'Model name|^CPU\(s\)'
summary() {  # JSON: the figures the A/B compares
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); s=r['step_times']; print({k: r.get(k) for k in ('total_s','setup_s','sweep_s','ip2p_s_per_edit','splat_training_s','steps_per_s_between_sweeps','gaussians_at_load','adam_steps','peak_gpu_gb','editor_warm_up_from_setup_start_s')}, 'median', s['median_ms'], 'p99', s['p99_ms'], 'reference', {k: r.get('reference_style', {}).get(k) for k in ('s_per_view','speedup','sweep_speedup')})" "$1"
}
edit() {  # NAME ARGS...
    local name=$1; shift
    python3 scripts/bench_edit.py --data $D --load-dir "$(ls -d $W/stone_horse/splatfacto/*/nerfstudio_models | tail -n 1)" \
        --ip2p-model $W/sd15 --vis viewer --output-dir $W/edits --json $R/$name.json "$@" > $R/$name.log 2>&1
    echo "$name: exit $? at $SECONDS s"; summary $R/$name.json
}
case ${1:-short} in
full)
    (python3 -m pytest -m gpu tests/test_optimizer_graph.py -q -p no:cacheprovider -ra > $R/gpu_tests.log 2>&1; echo "tests $? at $SECONDS s"; tail -n 2 $R/gpu_tests.log) &
    RESULTS=$R GPU_TESTS=0 bash scripts/gpu_bench.sh prepare $D; wait; echo "prepared at $SECONDS s"
    edit edit_cached_adam_eager --compile cached --adam-eager --reference-views 2
    [ $SECONDS -lt ${LAST_START:-430} ] && edit edit_cached_adam_graph --compile cached
    ;;
short)
    (python3 scripts/reconstruct.py --data $D --output-dir $W --steps 5000 --device cuda > $R/recon.log 2>&1; echo "recon $? at $SECONDS s") &
    (python3 -m pytest -m gpu tests/test_optimizer_graph.py tests/test_bench_edit.py -q -p no:cacheprovider -ra > $R/gpu_tests.log 2>&1; echo "tests $? at $SECONDS s"; tail -n 2 $R/gpu_tests.log) &
    python3 scripts/make_random_ip2p.py $W/sd15 --shape sd15 --fp16 > $R/make_editor.log 2>&1; echo "editor $? at $SECONDS s"
    wait
    for run in graph eager graph eager overlap; do
        [ $SECONDS -lt ${LAST_START:-240} ] || break
        case $run in eager) flag=--adam-eager;; overlap) flag=--overlap;; *) flag=;; esac
        edit edit_${run}_$SECONDS --compile off --steps 2500 $flag
    done
    ;;
warm)
    python3 -m pytest -m gpu tests/test_optimizer_graph.py -q -p no:cacheprovider -ra > $R/gpu_tests.log 2>&1
    echo "tests $? at $SECONDS s"; tail -n 2 $R/gpu_tests.log
    for run in graph eager graph eager graph eager; do
        [ $SECONDS -lt ${LAST_START:-480} ] || break
        edit edit_${run}_$SECONDS --compile cached --steps 2500 $([ $run = eager ] && echo --adam-eager)
    done
    ;;
*) echo "usage: adam_graph_ab.sh short|full|warm" >&2; exit 2 ;;
esac
