# Installs the Debian packages whose commands the tests need. Sourced by scripts/test.sh.
#
# The list is "package:command" pairs (a command may be an absolute file path, for packages
# without one: headers); a package is installed when any of its commands is
# missing, so a rerun with everything present costs nothing and touches no network.

# tool_commands LIST: the commands of LIST, one per line.
tool_commands() {
    local pair
    for pair in $1; do
        echo "${pair#*:}"
    done
}

# missing_packages LIST: the packages (deduplicated) with at least one missing command.
missing_packages() {
    local pair pkg cmd out=""
    for pair in $1; do
        pkg=${pair%%:*}
        cmd=${pair#*:}
        # A "command" starting with / is a file the package installs (headers: libbpf-dev).
        if { [ "${cmd#/}" != "$cmd" ] && [ ! -e "$cmd" ]; } ||
            { [ "${cmd#/}" = "$cmd" ] && ! command -v "$cmd" >/dev/null 2>&1; }; then
            case " $out " in
                *" $pkg "*) ;;
                *) out="$out $pkg" ;;
            esac
        fi
    done
    echo "$out"
}

# install_missing_tools LIST: apt-get installs what is missing; fails loudly otherwise.
install_missing_tools() {
    local list=$1 missing sudo="" policy=/usr/sbin/policy-rc.d status=0
    local wanted
    missing=$(missing_packages "$list")
    wanted=$missing
    if [ -z "${missing// /}" ]; then
        echo "all tools present"
        return 0
    fi
    echo "missing packages:$missing"
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "error: not root and no sudo: install these packages by hand:$missing" >&2
            return 1
        fi
    fi
    # Package installs must not start services: coturn's turnserver would take port 3478
    # (and 3479), which other engineers' Portico instances use. invoke-rc.d asks policy-rc.d;
    # exit status 101 means "action forbidden".
    # An existing policy is set aside for the install and put back afterwards (unless an
    # interrupted earlier run already set it aside).
    if [ -e "$policy" ] && [ ! -e "$policy.portico-saved" ]; then
        $sudo mv "$policy" "$policy.portico-saved"
    fi
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    # shellcheck disable=SC2086 # word splitting of $missing is the point
    if ! $sudo apt-get update -q; then
        echo "error: apt-get update failed" >&2
        status=1
    elif ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends $missing; then
        echo "error: apt-get install$missing failed" >&2
        status=1
    fi
    $sudo rm -f "$policy"
    if [ -e "$policy.portico-saved" ]; then
        $sudo mv "$policy.portico-saved" "$policy"
    fi
    [ "$status" -eq 0 ] || return 1
    missing=$(missing_packages "$list")
    if [ -n "${missing// /}" ]; then
        echo "error: still missing after install:$missing" >&2
        for c in $(tool_commands "$list"); do
            command -v "$c" >/dev/null 2>&1 || echo "  command not found: $c" >&2
        done
        return 1
    fi
    echo "installed:$wanted"
    return 0
}
