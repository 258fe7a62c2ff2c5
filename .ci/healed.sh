# Sourced by .ci/run (bash, CARGO_TARGET_DIR set).
healed_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A reused target directory can lose or mix up build outputs between runs (systemd-tmpfiles
# ages out /var/tmp, a disk clean-up, two directories merged) while cargo's fingerprints still
# call the crates fresh; rustc then stops with "can't find crate for `X`" (E0463; CI on
# 2026-12-02), E0460, E0464 or E0786. `healed CMD` runs CMD; on such an error it cleans the
# crates named and runs CMD again, and after five rounds rebuilds the target from scratch. Any
# other failure is CMD's own and fails CI. Tried on a fake command that prints each error.
healed() {
    local log round=0 crates c
    log=$(mktemp)
    while true; do
        # PIPESTATUS: CMD's own status, whether or not the caller set pipefail.
        if "$@" 2>&1 | tee "$log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then rm -f "$log"; return 0; fi
        crates=$(grep -oE "(can't find crate for|found possibly newer version of crate|found invalid metadata files for crate|candidates for \`[a-z]+\` dependency) \`[A-Za-z0-9_-]+\`" "$log" |
            sed -E 's/.*`(.*)`/\1/' | sort -u || true)
        if [ -z "$crates" ]; then rm -f "$log"; return 1; fi
        round=$((round + 1))
        echo "CI: the target directory lost build outputs of: $crates (round $round)" >&2
        if [ "$round" -gt 5 ]; then
            rm -rf "$CARGO_TARGET_DIR"
        else
            for c in $crates; do
                (cd "$healed_root" && { cargo clean -q --release -p "$c" 2>/dev/null ||
                    cargo clean -q --release -p "${c//_/-}" 2>/dev/null ||
                    { echo "CI: cannot clean $c alone; rebuilding the target" >&2; rm -rf "$CARGO_TARGET_DIR"; }; })
            done
        fi
        [ "$round" -le 6 ] || { rm -f "$log"; return 1; }
    done
}
