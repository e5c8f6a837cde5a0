# Shared by the demos (sourced, with the demo's own arguments): checks `PY DEMO_DIR`, sets PY, PLORA,
# ROOT and DEMO, keeps transformers off the model hub, and defines `step` and `run`.
if [[ $# -ne 2 ]]; then
    echo "usage: $0 PY DEMO_DIR" >&2
    exit 2
fi
PY=$1
PLORA="$(cd "$(dirname "$PY")" && pwd)/plora"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$2"
DEMO="$(cd "$2" && pwd)"
export HF_HUB_OFFLINE=1  # everything in a demo is local; never reach for the model hub

if [[ ! -x "$PLORA" ]]; then
    echo "demo: $PLORA not found; install the project first (make install)" >&2
    exit 2
fi

step() { printf '\n== %s\n' "$*"; }
# Show each command as it can be pasted back into a shell (quoted by %q), on stderr so --json output stays clean.
run() { { printf '$'; printf ' %q' "$@"; printf '\n'; } >&2; "$@"; }
