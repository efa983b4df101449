# Sourced by local.sh and docker.sh: messages, and finding cargo. The sourcing script sets
# `script` (its name, for messages) first.

say() { printf '%s\n' "$*"; }
die() { printf '%s: %s\n' "$script" "$*" >&2; exit 1; }

# cargo on PATH, or where rustup puts it.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo is not installed: install Rust from rustup.rs (stable 1.88 or later)"
}
