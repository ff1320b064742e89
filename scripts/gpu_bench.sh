#!/usr/bin/env bash
# The GPU measurements of the README in commands of under ten minutes each (prepare first; steps stands alone), on one
# CUDA machine with igs2gs and its dependencies installed.
# Results (logs, JSON) go to $RESULTS (default: outputs/gpu_bench/results).
#
#   bash scripts/gpu_bench.sh prepare DATA   # random sd15 editor; in parallel: splatfacto 15k reconstruction,
#                                            # the GPU tests, the editor's packages for the sweeps' batch shape,
#                                            # the byte-code of every imported package (below)
#   bash scripts/gpu_bench.sh edit DATA      # whole edits: packages from disk (the default, with the reference-style
#                                            # projection), the same with --pipeline.overlap-edits, and eager
#                                            # (EDITS: which of cached, cached_overlap, off, cached_old_step - the
#                                            # training step before 2026-12-07's second session: gsplat's checked
#                                            # inverse, LPIPS targets every step; cached_adam_eager - the splats'
#                                            # Adam steps launched one by one, not replayed from their CUDA graph
#                                            # (A/B with cached: EDITS="cached cached_adam_eager cached
#                                            # cached_adam_eager"); cached_unet_direct - the editor's packaged UNet
#                                            # called directly, not replayed from its CUDA graph (A/B with cached
#                                            # likewise); cached_cold - the CUDA libraries evicted from the
#                                            # page cache first, cached_cold_read_ahead - the same with
#                                            # --read-ahead-cuda-libraries (their A/B); setup_profile - the set-up alone
#                                            # under cProfile, its slowest functions printed; setup - the set-up
#                                            # alone; setup_no_bytecode - the same compiling every module from
#                                            # source, as the lent machines' set-ups did before 2026-12-07's seventh
#                                            # session; a run named twice gets _2, _3 on its files; default the first
#                                            # three)
#   bash scripts/gpu_bench.sh reconstruct DATA  # splatfacto 15k of a second scene alone, for its `edit` (e.g. ~100 views:
#                                            # python3 scripts/make_scene.py outputs/scene100 --views 100 --size 512)
#   bash scripts/gpu_bench.sh extra DATA     # the editor alone (bench_ip2p: reference-style, eager, packaged), and the
#                                            # default edit with --gsplat-checked-inverse (A/B with edit's first run)
#   bash scripts/gpu_bench.sh batch DATA     # the editor alone at another packaged batch, TRY_BATCH (default 19: 73
#                                            # views in four batches instead of five of 15): s/edit and peak memory
#   bash scripts/gpu_bench.sh firstuse DATA  # after prepare, before any edit: which CUDA libraries are not yet in the
#                                            # page cache, and the editor's first cuDNN/cuBLAS/SDPA/package calls in
#                                            # four processes: the first, the next, after evicting the libraries from
#                                            # the cache, after reading them in (bench_editor_load.py --packages,
#                                            # cuda_library_cache.py; the driver's JIT cache's size around the first)
#   bash scripts/gpu_bench.sh steps DATA     # the training step's A/B: PAIRS pairs (default 1) of 2,500-step edits
#                                            # with the eager editor, the current step against cached_old_step's
#                                            # (~60 s each for stone_horse on an H100); first, if the scene has no
#                                            # reconstruction, the GPU tests beside one (RECON_STEPS=10000: 334 s)
#
# Work files stay in outputs/gpu_bench (keep the machine warm between the phases). BATCH, HEIGHT, WIDTH: the sweeps'
# padded batch shape (stone_horse, 73 training views of 511x511: 15 511 511). REFERENCE_VIEWS: reference-style views
# timed per edit run (default 2); REFERENCE_STEPS: training steps timed the reference's way after the cached edit, for a
# second reference-style projection (default 300; none without reference views). GPU_TESTS=0: prepare leaves the GPU
# tests out (prepare and one edit then fit in one call). On this project's lent GPU machine (the device tool; the
# machine goes back 30 s after a call, so send the next call at once):
#   source .device/env.sh > /dev/null && RESULTS=$OUT bash scripts/gpu_bench.sh prepare .device/data/stone_horse
# A scene's default edit in one call (a machine taken back between calls loses the reconstruction and the packages):
#   GPU_TESTS=0 bash scripts/gpu_bench.sh prepare D && EDITS=cached bash scripts/gpu_bench.sh edit D  # stone_horse: 525 s
#   (EDITS="cached setup_profile": then where the set-up went, ~40 s more)
set -uo pipefail
cd "$(dirname "$0")/.."
phases="prepare|edit|extra|batch|reconstruct|steps|firstuse"
usage="usage: gpu_bench.sh $phases DATA"
phase=${1:-}; data=${2:-}
if [[ ! "$phase" =~ ^($phases)$ || ! -d "$data" ]]; then
    echo "$usage (DATA: a nerfstudio scene folder)" >&2; exit 2
fi
edit_runs="cached cached_overlap off"  # edit's runs by default; EDITS picks among these and more_runs
more_runs="cached_old_step cached_adam_eager cached_unet_direct cached_cold cached_cold_read_ahead setup_profile setup setup_no_bytecode"
reference_views=${REFERENCE_VIEWS:-2} reference_steps=${REFERENCE_STEPS:-300}
[[ $reference_views == 0 ]] && reference_steps=0  # the steps extend the views' projection
old_step="--gsplat-checked-inverse --no-lpips-target-cache"  # the training step before 2026-12-07's second session
for run in ${EDITS:-}; do
    [[ " $edit_runs $more_runs " == *" $run "* ]] || { echo "$usage (EDITS: some of $edit_runs $more_runs, not $run)" >&2; exit 2; }
done
# The igs2gs that python3 imports must be this checkout's: on a machine kept warm between calls, a second
# `pip install --target` of another checkout leaves the first one's package in place (2026-12-07: six edits of a
# branch failed on a module the installed copy lacked). -P: as the scripts see it, not from the current folder
installed=$(python3 -P -c 'import igs2gs, os; print(os.path.dirname(igs2gs.__file__))' 2> /dev/null)
if [[ -z $installed ]] || ! diff -rq -x __pycache__ igs2gs "$installed" > /dev/null 2>&1; then
    echo "python3 imports ${installed:-no igs2gs}, not this checkout's igs2gs/: install it (pip install --no-deps --upgrade .)" >&2
    exit 2
fi
work=outputs/gpu_bench
results=${RESULTS:-$work/results}
mkdir -p "$work" "$results"
export IGS2GS_PACKAGE_DIR=${IGS2GS_PACKAGE_DIR:-$PWD/$work/packages} PYTHONUNBUFFERED=1
editor=$work/sd15
scene=$(basename "$data")  # nerfstudio names a run's folder after its data folder
prompt="turn the horse into a giraffe"

# An installation made with byte-code (as pip makes one by default) imports without compiling thousands of modules:
# set-up figures then are a user's, not those of a machine installed with --no-compile. The byte-code goes to a cache
# of its own (PYTHONPYCACHEPREFIX, exported to every run below), so folders this user cannot write or a system Python's
# dist-packages are cached too; every folder on the path is compiled into it, the standard library's included (with a
# prefix, Python no longer reads the __pycache__ folders beside the sources). `python3 -m compileall`, not compileall
# called from a script on stdin: Python 3.12's compileall starts its workers through forkserver, which cannot re-run a
# main module read from stdin, so every worker died and the cache stayed empty (the set-ups timed from 1f58e1f to this
# fix include ~12 s of compiling on the lent H100's slower hosts).
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/igs2gs-pycache}
compile_byte_code() {
    local folders started=$SECONDS failed
    mapfile -t folders < <(python3 -c 'import os, sys
print("\n".join(f for f in sys.path if f and os.path.isdir(f) and os.path.realpath(f) != os.getcwd()))')
    python3 -m compileall -q -j 0 "${folders[@]}" > "$results/compileall.log" 2>&1  # exit 1: some file did not compile
    failed=$(grep -c '^\*\*\*' "$results/compileall.log")
    echo "byte-code of ${#folders[@]} import folders in $((SECONDS - started)) s into $PYTHONPYCACHEPREFIX ($failed files failed)"
}
# prepare times nothing of set-up: it compiles beside its work (a module half written is never read: each is written
# to a temporary file and renamed); the other phases compile first (seconds once the cache is full)
if [[ $phase == prepare ]]; then compile_byte_code & byte_code=$!; else compile_byte_code; fi

reconstruct() {  # splatfacto of the scene (RECON_STEPS, default 15k; no evaluations), its log under the scene's name
    python3 scripts/reconstruct.py --data "$data" --output-dir "$work" --steps "${RECON_STEPS:-15000}" --device cuda \
        --no-eval > "$results/reconstruct_$scene.log" 2>&1
}

make_editor() {  # the random-weight SD-1.5-shaped editor
    python3 scripts/make_random_ip2p.py "$editor" --shape sd15 --fp16 > "$results/make_editor.log" 2>&1 || { cat "$results/make_editor.log"; exit 1; }
}

start_reconstruction_and_tests() {  # in the background: the reconstruction is the long pole (330-480 s at 15k)
    reconstruct &
    reconstruction=$!
    tests=
    [[ ${GPU_TESTS:-1} == 0 ]] && return  # GPU_TESTS=0: leave them out (a call that must also fit an edit)
    # -X faulthandler: an abort after the tests (2026-12-07: "terminate called without an active exception", rc 134)
    # prints every thread's Python stack, naming the thread still running
    python3 -X faulthandler -m pytest -m gpu tests -q -p no:cacheprovider -ra > "$results/gpu_tests.log" 2>&1 &
    tests=$!
}

wait_reconstruction_and_tests() {
    [[ -z $tests ]] || { wait "$tests"; echo "gpu tests: exit $?"; tail -n 3 "$results/gpu_tests.log"; }
    wait "$reconstruction"; echo "reconstruction: exit $?"; tail -n 2 "$results/reconstruct_$scene.log"
}

libraries() {  # resident|evict|prefetch ARGS...: torch's CUDA libraries in the page cache, the totals' lines
    python3 scripts/cuda_library_cache.py "$@" | grep -E "^read|in all"
}

load_dir() {  # the scene's latest reconstruction
    ls -d "$work/$scene"/splatfacto/*/nerfstudio_models | tail -n 1
}

bench_edit() {  # NAME ARGS...: one whole edit of the reconstructed scene, its JSON and log under NAME, a summary printed
    local name=${scene}_$1
    shift
    python3 scripts/bench_edit.py --data "$data" --load-dir "$(load_dir)" --ip2p-model "$editor" --vis viewer \
        --output-dir "$work/edits" --json "$results/edit_$name.json" "$@" > "$results/edit_$name.log" 2>&1
    echo "edit ($name): exit $?"
    python3 - "$results/edit_$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r.get(k) for k in ("total_s", "total_with_imports_s", "setup_s", "sweep_s", "ip2p_s_per_edit", "splat_training_s", "peak_gpu_gb", "editor_packages", "adam_steps", "unet_calls")},
      "median step ms:", r.get("step_times", {}).get("median_ms"), "before it:", r.get("splat_training_split_s", {}).get("before_first_step"),
      "warm-up:", r.get("editor_warm_up_from_setup_start_s"),
      "reference:", {k: r.get("reference_style", {}).get(k) for k in ("s_per_view", "speedup", "sweep_speedup", "step_median_ms", "speedup_reference_steps", "steps_error")})
for row in r.get("setup_profile", {}).get("by_cumulative_time", [])[:25]:  # setup_profile's run
    print(f'{row["cumulative_ms"] / 1000:8.2f} s {row["own_ms"] / 1000:8.2f} s own {row["calls"]:>8} calls  {row["function"]}')
PY
}

case "$phase" in
prepare)
    start_reconstruction_and_tests
    make_editor
    python3 - "$editor" "$prompt" "${BATCH:-15}" "${HEIGHT:-511}" "${WIDTH:-511}" > "$results/packages.log" 2>&1 <<'PY'
import sys, time
import torch
from igs2gs.ip2p import InstructPix2Pix
model, prompt, batch, height, width = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
started = time.perf_counter()
editor = InstructPix2Pix.from_pretrained(model, device="cuda", packages="compile")
editor.prepare_compiled(batch, height, width, prompt)
print(f"packages for batch {batch} {width}x{height}: {sorted(editor._packages)} in {time.perf_counter() - started:.1f} s")
# Their first calls, as a user's compiling run makes them: the driver compiles some of their code at its first use on a
# machine and caches it (~3 s of the UNet's first call on an H100, 2026-12-08); the first `edit` after prepare no longer pays it.
print(f"their first calls: {editor.warm_up(batch, height, width, prompt):.1f} s")
PY
    echo "packages: exit $?"; tail -n 2 "$results/packages.log"
    wait_reconstruction_and_tests
    wait "$byte_code"
    ;;
edit)
    [[ -d $editor ]] || make_editor
    declare -A times_run=()
    for run in ${EDITS:-$edit_runs}; do
        times_run[$run]=$((${times_run[$run]:-0} + 1))
        name=$run
        ((times_run[$run] > 1)) && name=${run}_${times_run[$run]}
        case "$run" in
        cached) bench_edit "$name" --compile cached --reference-views "$reference_views" --reference-steps "$reference_steps" ;;
        cached_overlap) bench_edit "$name" --compile cached --overlap ;;
        off) bench_edit "$name" --compile off ;;
        cached_old_step) bench_edit "$name" --compile cached $old_step ;;
        cached_adam_eager) bench_edit "$name" --compile cached --adam-eager ;;
        cached_unet_direct) bench_edit "$name" --compile cached --unet-direct ;;  # the UNet graph's A/B: alternate with cached
        cached_cold) libraries evict; bench_edit "$name" --compile cached ;;
        cached_cold_read_ahead) libraries evict; bench_edit "$name" --compile cached --read-ahead-cuda-libraries ;;
        setup_profile) bench_edit "$name" --compile cached --setup-only --profile-setup ;;
        setup) bench_edit "$name" --compile cached --setup-only ;;
        setup_no_bytecode)  # an empty cache that stays empty: every import compiles its module
            (export PYTHONPYCACHEPREFIX=$(mktemp -d) PYTHONDONTWRITEBYTECODE=1; bench_edit "$name" --compile cached --setup-only) ;;
        esac
    done
    ;;
reconstruct)
    reconstruct
    echo "reconstruction: exit $?"; tail -n 2 "$results/reconstruct_$scene.log"
    ;;
extra)
    python3 scripts/bench_ip2p.py --model "$editor" --views 45 --batch-sizes 15 --reference-views 2 --compile-batch 15 \
        --variants compiled --json "$results/ip2p.json" > "$results/ip2p.log" 2>&1
    echo "bench_ip2p: exit $?"; tail -n 12 "$results/ip2p.log"
    bench_edit cached_checked_inverse --compile cached --gsplat-checked-inverse
    ;;
batch)  # compiles the packages for this batch first (UNet 148-196 s on an H100)
    try=${TRY_BATCH:-19}
    python3 scripts/bench_ip2p.py --model "$editor" --views $((3 * try)) --batch-sizes "$try" --reference-views 1 \
        --compile-batch "$try" --variants compiled --json "$results/ip2p_batch$try.json" > "$results/ip2p_batch$try.log" 2>&1
    echo "bench_ip2p batch $try: exit $?"; tail -n 12 "$results/ip2p_batch$try.log"
    ;;
firstuse)  # an H100 host's first edit after prepare paid ~4.4 s more warm-up than the next processes (2026-12-07): the
    # driver's JIT at the packages' first calls (2026-12-08), which prepare now pays; `rm -rf ~/.nv/ComputeCache` first to see it
    jit_cache() { local size; size=$(du -sk ~/.nv/ComputeCache 2> /dev/null | cut -f1); echo "driver JIT cache: ${size:-no folder} kB"; }
    probe() {  # NAME: the editor's first calls in a fresh process, one line
        python3 scripts/bench_editor_load.py "$editor" --packages "${BATCH:-15}" "${HEIGHT:-511}" "${WIDTH:-511}" \
            --json "$results/first_use_$1.json" > "$results/first_use_$1.log" 2>&1
        echo "probe $1: exit $?: $(grep -E 'first|call' "$results/first_use_$1.log" | tr '\n' ';')"
    }
    libraries resident --json "$results/libraries_after_prepare.json"; jit_cache
    probe first; libraries resident --json "$results/libraries_after_first.json"; jit_cache
    probe second
    libraries evict; probe evicted
    libraries prefetch --json "$results/libraries_prefetched.json"; probe prefetched
    ;;
steps)  # alternating, so that a drift of the machine's pace shows as a spread, not as a difference
    reconstructed=$(load_dir 2> /dev/null)
    [[ -n $reconstructed ]] || start_reconstruction_and_tests
    [[ -d $editor ]] || make_editor
    [[ -n $reconstructed ]] || wait_reconstruction_and_tests
    for pair in $(seq "${PAIRS:-1}"); do
        bench_edit "steps_now_$pair" --compile off --steps 2500
        bench_edit "steps_old_$pair" --compile off --steps 2500 $old_step
    done
    ;;
esac
