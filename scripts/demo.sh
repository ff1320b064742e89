#!/usr/bin/env bash
# The main job on an embedded default: make the demo scene, reconstruct it with splatfacto, edit it
# with igs2gs and write a before/after sheet (original | render | edit).
#
#   bash scripts/demo.sh                       # CUDA + the real InstructPix2Pix (downloaded once)
#   bash scripts/demo.sh --device cpu --tiny   # anywhere: CPU rasterizer + a tiny RANDOM editor (noise, not an edit)
#   options: --prompt "..."  --output-dir DIR  --skip-install
set -euo pipefail
cd "$(dirname "$0")/.."

device=auto; tiny=0; install=1; out=demo_output
prompt="make it look like a marble sculpture"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --tiny) tiny=1; shift ;;
        --prompt) prompt="$2"; shift 2 ;;
        --output-dir) out="$2"; shift 2 ;;
        --skip-install) install=0; shift ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

if [ "$install" = 1 ]; then
    bash scripts/install.sh
fi
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
if [ "$device" = auto ]; then
    device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ "$device" = cuda ]; then
    views=64; size=384; recon_steps=7000
    edit_flags=()
else
    views=16; size=48; recon_steps=200
    # Short schedule for the CPU rasterizer (dense, slow); no densification at this size.
    edit_flags=(--machine.device-type cpu --pipeline.gs-steps 20 --max-num-iterations 60
                --pipeline.diffusion-steps 10 --pipeline.model.stop-split-at 0
                --pipeline.model.lpips-pretrained-backbone False)
fi
if [ "$tiny" = 1 ]; then
    python scripts/make_random_ip2p.py "$out/tiny-ip2p" --shape tiny >/dev/null
    edit_flags+=(--pipeline.ip2p-model "$out/tiny-ip2p")
    echo "NOTE: --tiny edits with a random-weight model: the 'edit' column is noise, not an edit."
fi

echo "== 1/3 demo scene: $views views of ${size}px"
python scripts/make_scene.py "$out/scene" --views "$views" --size "$size" --seed 0 >/dev/null
echo "== 2/3 splatfacto reconstruction ($recon_steps steps on $device)"
python scripts/reconstruct.py --data "$out/scene" --output-dir "$out/runs" --steps "$recon_steps" --device "$device" >"$out/reconstruct.log" 2>&1 \
    || { tail -30 "$out/reconstruct.log"; exit 1; }
load_dir=$(ls -d "$out"/runs/scene/splatfacto/*/nerfstudio_models | tail -1)
echo "== 3/3 igs2gs: \"$prompt\""
ns-train igs2gs --data "$out/scene" --load-dir "$load_dir" --output-dir "$out/runs" \
    --pipeline.prompt "$prompt" --vis tensorboard --viewer.quit-on-train-completion True "${edit_flags[@]}" \
    >"$out/igs2gs.log" 2>&1 || { tail -30 "$out/igs2gs.log"; exit 1; }
run=$(ls -d "$out"/runs/scene/igs2gs/* | tail -1)
sheet=$(ls "$run"/igs2gs/sheets/sweep_*.png | tail -1)
cp "$sheet" "$out/before_after.png"
grep -E "igs2gs sweep [0-9]+:" "$out/igs2gs.log" | sed 's/^ *\[[^]]*\] *//' || true
echo "before/after sheet (original | render | edit): $out/before_after.png"
echo "edited scene: $run  (ns-viewer --load-config $run/config.yml)"
