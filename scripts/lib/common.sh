# Helpers for scripts/test.sh: section headers, timed steps, the test-count summary.
# Sourced, not run; expects FAILED_STEPS to be an array in the caller.

section() {
    printf '\n==== %s ====\n' "$*"
}

# step NAME LIMIT CMD...: runs CMD under a time limit and records NAME as failed when it
# fails, without stopping the script, so one run reports every broken step.
step() {
    local name=$1 limit=$2
    shift 2
    local t0 status
    t0=$(date +%s)
    timeout --kill-after=30s "$limit" "$@"
    status=$?
    if [ "$status" -eq 124 ]; then
        echo "$name: did not finish within $limit" >&2
    fi
    if [ "$status" -ne 0 ]; then
        echo "---- $name FAILED (exit $status, $(( $(date +%s) - t0 )) s)"
        FAILED_STEPS+=("$name")
    else
        echo "---- $name ok ($(( $(date +%s) - t0 )) s)"
    fi
    return 0
}

# sum_test_results LOG: prints "PASSED FAILED" summed over every libtest
# "test result: ... N passed; M failed; ..." line in LOG (unit, integration and doc tests).
sum_test_results() {
    awk '
        /^test result: / {
            for (i = 1; i <= NF; i++) {
                if ($(i + 1) ~ /^passed;?$/) p += $i
                if ($(i + 1) ~ /^failed;?$/) f += $i
            }
        }
        END { printf "%d %d\n", p, f }
    ' "$1"
}
