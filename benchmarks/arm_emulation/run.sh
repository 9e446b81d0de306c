#!/usr/bin/env bash
# ARM correctness check under emulation: pruned and int8 models made on x86 must give the same outputs
# on aarch64 (fp32 to 1e-4, int8 within 2 quantisation steps or the same accuracy). Not a timing.
#
#   bash benchmarks/arm_emulation/run.sh [WORK_DIR]          # QUICK=1: RetinaFace models only
#
# Sets up, once, under $ONNXPRUNE_ARM64_CACHE (default ~/.cache/onnxprune/arm64):
#   rootfs-bookworm/   Debian arm64 files (debootstrap --foreign, packages unpacked, never configured)
#   site-ort*-np*/     the aarch64 manylinux wheels of the host's onnxruntime and numpy versions
# and runs the aarch64 Python with qemu-aarch64-static explicitly (no binfmt_misc registration needed),
# once per emulated CPU in $ARM_CPUS: "max" exposes dotprod/i8mm/SVE, "cortex-a72" (Raspberry Pi 4)
# plain NEON, so both of ONNX Runtime's int8 kernel families on ARM are exercised.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${ONNXPRUNE_ARM64_CACHE:-$HOME/.cache/onnxprune/arm64}
WORK=${1:-$CACHE/work}
PY=${PYTHON:-python}
ARM_CPUS=${ARM_CPUS:-max cortex-a72}
SUITE=bookworm
PYVER=3.11  # bookworm's python3
ROOT=$CACHE/rootfs-$SUITE
mkdir -p "$CACHE"

die() { echo "run.sh: error: $*" >&2; exit 2; }

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        || die "needs qemu-aarch64-static and debootstrap (apt-get install qemu-user-static debootstrap)"
    apt-get install -y -q qemu-user-static debootstrap >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q qemu-user-static debootstrap >/dev/null; } \
        || die "apt-get install qemu-user-static debootstrap failed"
fi

if [ ! -x "$ROOT/usr/bin/python$PYVER" ]; then
    echo "== arm64 rootfs ($SUITE) -> $ROOT"
    rm -rf "$ROOT.tmp"
    # --foreign only downloads and unpacks: the second stage would need binfmt_misc to run arm64
    # maintainer scripts. Unpacking every downloaded .deb is enough for a Python that only imports wheels.
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include="python$PYVER-minimal,libpython$PYVER-stdlib,libstdc++6" "$SUITE" "$ROOT.tmp" >"$CACHE/debootstrap.log" \
        || die "debootstrap failed, see $CACHE/debootstrap.log"
    for deb in "$ROOT.tmp"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT.tmp"; done
    mv "$ROOT.tmp" "$ROOT"
fi

# qemu-user up to 7.x hands the guest the host's x86 /proc/cpuinfo; ONNX Runtime's cpuinfo library parses
# it as ARM and segfaults on import. With -L, qemu looks absolute paths up in the rootfs first, so the guest
# reads $ROOT/proc/cpuinfo instead; newer qemu emulates the file itself. It must describe the emulated CPU:
# cpuinfo also trusts the part number (a Neoverse-N1 part turns on dot-product kernels, which a cortex-a72
# then rejects with SIGILL).
fake_cpuinfo() {  # fake_cpuinfo QEMU_CPU
    local features part variant revision
    case $1 in
        cortex-a72) features="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"; part=0xd08; variant=0x0; revision=3 ;;
        cortex-a53) features="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"; part=0xd03; variant=0x0; revision=4 ;;
        # max (and anything newer than N1): an N1 part; its dotprod kernels exist on every such CPU
        *) features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
           part=0xd0c; variant=0x3; revision=1 ;;
    esac
    mkdir -p "$ROOT/proc"
    for i in 0 1; do
        printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
            "$i" "$features" "$variant" "$part" "$revision"
    done >"$ROOT/proc/cpuinfo"
}

ORT=$("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')
NP=$("$PY" -c 'import numpy; print(numpy.__version__)')
SITE=$CACHE/site-ort$ORT-np$NP
if [ ! -d "$SITE/onnxruntime" ]; then
    echo "== aarch64 wheels onnxruntime==$ORT numpy==$NP -> $SITE"
    rm -rf "$SITE.tmp"
    # unpacking a wheel is architecture-independent: the host's pip installs the aarch64 ones
    "$PY" -m pip install -q --target "$SITE.tmp" --only-binary=:all: --implementation cp \
        --python-version "$PYVER" --abi "cp${PYVER/./}" --platform manylinux_2_28_aarch64 \
        --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        "onnxruntime==$ORT" "numpy==$NP" || die "pip could not fetch the aarch64 wheels"
    mv "$SITE.tmp" "$SITE"
fi

arm_python() {  # arm_python CPU ARGS...: the emulated aarch64 Python with the aarch64 wheels
    local cpu=$1; shift
    fake_cpuinfo "$cpu"
    PYTHONPATH=$SITE PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
        qemu-aarch64-static -cpu "$cpu" -L "$ROOT" "$ROOT/usr/bin/python$PYVER" "$@"
}
arm_python max -c 'import platform, onnxruntime; print("aarch64 env:", platform.machine(), "python", platform.python_version(), "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())'

WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)
cd "$WORK"  # tools that drop temporary files in the current directory drop them here, not in the repository
echo "== x86: models, inputs and reference outputs -> $WORK"
"$PY" "$HERE/prepare.py" "$WORK" ${QUICK:+--quick}
rm -rf "$WORK/outputs"
"$PY" "$HERE/compare.py" run "$WORK" --tag x86_64

tags=()
for cpu in $ARM_CPUS; do
    echo "== aarch64 (qemu -cpu $cpu)"
    arm_python "$cpu" "$HERE/compare.py" run "$WORK" --tag "aarch64-$cpu"
    tags+=("aarch64-$cpu")
done
# XNNPACK: only if the aarch64 wheel has it (the PyPI one does not; compare.py says so and skips it)
arm_python max "$HERE/compare.py" run "$WORK" --tag aarch64-xnnpack --provider XnnpackExecutionProvider
[ -f "$WORK/outputs/aarch64-xnnpack/info.json" ] && tags+=(aarch64-xnnpack)

echo "== compare"
"$PY" "$HERE/compare.py" diff "$WORK" x86_64 "${tags[@]}"
