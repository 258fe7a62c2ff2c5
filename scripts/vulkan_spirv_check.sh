#!/usr/bin/env bash
# Validates every SPIR-V kernel burn's vulkan backend compiles in a run, with spirv-val (Debian's
# spirv-tools). Usage: scripts/vulkan_spirv_check.sh OUTDIR COMMAND...; for example
#   VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.json scripts/vulkan_spirv_check.sh /tmp/spv \
#       target/release/unetpp predict --backend vulkan --checkpoint ... --input ... --out ...
# COMMAND runs with CUBECL_DEBUG_LOG (cubecl prints each kernel's disassembly before the driver
# compiles it), with the autotune cache off (so every candidate is compiled, as on a fresh
# machine), and may crash: the kernels logged up to then are still checked. Writes OUTDIR/N.spvasm,
# then prints one line per kernel: ok or INVALID, its name, and spirv-val's first error.
set -uo pipefail
out=$1
shift
mkdir -p "$out"
CUBECL_DEBUG_LOG="$out/cubecl.log" CUBECL_AUTOTUNE_CACHE=0 "$@" >"$out/run.txt" 2>&1
echo "exit status $? (139: segfault); log in $out/cubecl.log"
awk -v dir="$out" '
    /^name: / { name = $2 }
    /^```spirv/ { inside = 1; n++; file = dir "/" n ".spvasm"; print "; " name > file; next }
    /^```/ { if (inside) close(file); inside = 0 }
    inside { print > file }
' "$out/cubecl.log"
for asm in $(ls "$out"/*.spvasm 2>/dev/null | sort -V); do
    spv=${asm%.spvasm}.spv
    name=$(head -1 "$asm" | cut -c3-)
    if ! spirv-as --target-env vulkan1.3 "$asm" -o "$spv" 2>"$out/err.txt"; then
        echo "UNASSEMBLED $(basename "$asm") $name: $(head -1 "$out/err.txt")"
    elif spirv-val --target-env vulkan1.3 "$spv" 2>"$out/err.txt"; then
        echo "ok $(basename "$asm") $name"
    else
        echo "INVALID $(basename "$asm") $name: $(head -1 "$out/err.txt")"
    fi
done
