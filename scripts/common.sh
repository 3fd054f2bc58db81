# Shared by scripts/setup and scripts/env (sourced, not run).
# Decides how the fenics-red stack runs on this host:
#   native: a Debian 13 / newer Ubuntu host (or the Docker image) with the packages installed by apt;
#   root:   a Debian 12 (or older) host runs a Debian 13 root made by mmdebstrap, through bwrap.
# FENICS_RED_MODE=native|root overrides the choice; FENICS_RED_ROOT sets where the root lives.

FENICS_RED_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
FENICS_RED_PACKAGES_FILE="$FENICS_RED_REPO/docker/packages.txt"
FENICS_RED_VENV="$FENICS_RED_REPO/.venv"
FENICS_RED_RUFF=0.15.22   # the linter version make test runs (pip, into the venv)
FENICS_RED_ROOT="${FENICS_RED_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/fenics-red/trixie}"

fenics_red_packages() {
    grep -v '^[[:space:]]*#' "$FENICS_RED_PACKAGES_FILE" | grep -v '^[[:space:]]*$'
}

fenics_red_mode() {
    if [ -n "${FENICS_RED_MODE:-}" ]; then
        echo "$FENICS_RED_MODE"; return
    fi
    local major=0
    if [ -r /etc/debian_version ]; then
        major="$(cut -d. -f1 /etc/debian_version)"
        case "$major" in (*[!0-9]*|'') major=99 ;; esac   # "trixie/sid" and Ubuntu's "bookworm/sid"
    fi
    if [ -r /etc/os-release ] && grep -q '^ID=ubuntu' /etc/os-release; then
        # Ubuntu 25.04 and newer ship DOLFINx 0.9 in python3-dolfinx-real.
        local ver; ver="$(. /etc/os-release; echo "${VERSION_ID%%.*}")"
        if [ "${ver:-0}" -ge 25 ]; then echo native; else echo root; fi
        return
    fi
    if [ "$major" -ge 13 ]; then echo native; else echo root; fi
}

fenics_red_stamp() {
    # What the venv was built from: a change re-runs pip install.
    { fenics_red_mode; cat "$FENICS_RED_REPO/pyproject.toml"; } | sha256sum | cut -c1-16
}

fenics_red_as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Run a command in the environment without the venv check (used by setup itself).
fenics_red_exec() {
    local mode; mode="$(fenics_red_mode)"
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm}"
    export OMPI_MCA_rmaps_base_oversubscribe=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
    # yield the core while waiting in MPI calls: busy polling starves ranks on shared cores
    export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"
    export MPLBACKEND="${MPLBACKEND:-Agg}" PYVISTA_OFF_SCREEN=true
    # OpenBLAS's idle workers sleep after 2^20 cycles, not 2^28: they no longer take the cores
    # from torch between two calls (fenics_red.threads.SPIN_DEFAULTS, measured there)
    export OPENBLAS_THREAD_TIMEOUT="${OPENBLAS_THREAD_TIMEOUT:-20}"
    export FENICS_RED_INSIDE=1
    unset PYTHONPATH PYTHONHOME PYTHONSTARTUP
    local path="$PATH"
    # Inside the root the host's PATH (pyenv shims, ...) means nothing: use the root's own.
    [ "$mode" = root ] && path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    if [ -d "$FENICS_RED_VENV/bin" ]; then
        export VIRTUAL_ENV="$FENICS_RED_VENV"
        path="$FENICS_RED_VENV/bin:$path"
    fi
    # scripts/bin/mpirun clears the session directories that killed launchers left (see there)
    export PATH="$FENICS_RED_REPO/scripts/bin:$path"
    if [ "$mode" = native ]; then
        exec "$@"
    fi
    local args=(--bind "$FENICS_RED_ROOT" / --dev /dev --proc /proc --bind /sys /sys
                --bind /tmp /tmp --die-with-parent)
    [ -r /etc/resolv.conf ] && args+=(--ro-bind /etc/resolv.conf /etc/resolv.conf)
    # A user's home is visible inside; root's /root stays the root's own (it holds the JIT cache).
    [ "$(id -u)" != 0 ] && [ -n "${HOME:-}" ] && [ -d "$HOME" ] && args+=(--bind "$HOME" "$HOME")
    args+=(--bind "$FENICS_RED_REPO" "$FENICS_RED_REPO")
    # the working folder, unless it is a system folder of the root (/, /usr, /etc, root's
    # /root, ...): binding the host's over it would hide the stack
    local cwd; cwd="$(pwd -P)"
    case "$cwd" in
        ("$FENICS_RED_REPO"|"$FENICS_RED_REPO"/*|/tmp|/tmp/*) ;;
        (/|/usr|/usr/*|/etc|/etc/*|/bin|/bin/*|/sbin|/sbin/*|/lib|/lib/*|/lib32|/lib32/*|/lib64|\
         /lib64/*|/libx32|/libx32/*|/var|/var/lib|/var/lib/*|/boot|/boot/*|/run|/run/*|/proc|\
         /proc/*|/sys|/sys/*|/dev|/dev/*|/root|/root/.cache|/root/.cache/*) ;;
        (*) args+=(--bind "$cwd" "$cwd") ;;
    esac
    local extra
    IFS=: read -r -a extra <<< "${FENICS_RED_BINDS:-}"
    for p in "${extra[@]}"; do
        [ -n "$p" ] || continue
        if [ -e "$p" ]; then args+=(--bind "$p" "$p")
        else echo "fenics-red: FENICS_RED_BINDS: $p does not exist; not made visible" >&2; fi
    done
    exec bwrap "${args[@]}" --chdir "$cwd" -- "$@"
}
