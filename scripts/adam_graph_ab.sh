#!/usr/bin/env bash
# Adam CUDA-graph A/B on whatever H100 comes: stone_horse reconstructed in 5k steps, 2500-step edits, eager editor.
# Usage on the device: source .device/env.sh > /dev/null && LAST_START=235 bash scripts/adam_graph_ab.sh (results in $OUT)
export PYTHONPYCACHEPREFIX=/tmp/igs2gs-pycache PYTHONUNBUFFERED=1
R=$OUT; W=outputs/gpu_bench; D=.device/data/stone_horse
nvidia-smi --query-gpu=name,persistence_mode --format=csv,noheader
(python3 scripts/reconstruct.py --data $D --output-dir $W --steps 5000 --device cuda > $R/recon.log 2>&1; echo "recon $? at $SECONDS s") &
(python3 -m pytest -m gpu tests/test_optimizer_graph.py tests/test_bench_edit.py -q -p no:cacheprovider -ra > $R/gpu_tests.log 2>&1; echo "tests $? at $SECONDS s"; tail -n 2 $R/gpu_tests.log) &
python3 scripts/make_random_ip2p.py $W/sd15 --shape sd15 --fp16 > $R/make_editor.log 2>&1; echo "editor $? at $SECONDS s"
wait
L=$(ls -d $W/stone_horse/splatfacto/*/nerfstudio_models | tail -n 1)
for run in graph eager graph eager overlap; do
    [ $SECONDS -lt ${LAST_START:-240} ] || break
    case $run in eager) flag=--adam-eager;; overlap) flag=--overlap;; *) flag=;; esac
    name=edit_${run}_$SECONDS
    python3 scripts/bench_edit.py --data $D --load-dir $L --ip2p-model $W/sd15 --vis viewer --output-dir $W/edits \
        --compile off --steps 2500 $flag --json $R/$name.json > $R/$name.log 2>&1
    echo "$name: exit $? at $SECONDS s"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); s=r['step_times']; print({k: r.get(k) for k in ('total_s','setup_s','sweep_s','splat_training_s','steps_per_s_between_sweeps','gaussians_at_load','adam_steps','peak_gpu_gb')}, 'median', s['median_ms'], 'p99', s['p99_ms'])" $R/$name.json
done
