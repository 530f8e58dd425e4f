#!/bin/sh
# embedkit container entrypoint: what `docker run IMAGE ARGS...` runs.
#
#   serve [flags]         embedkit serve: what SageMaker runs (`docker run IMAGE serve`); listens on
#                         ${EMBEDKIT_HOST:-0.0.0.0}:${SAGEMAKER_BIND_TO_PORT:-8080}, model from HF_MODEL_ID,
#                         /opt/ml/model (SM_MODEL_DIR) when it holds one, else the baked-in default
#   embed IN OUT [flags]  the batch job (SageMaker Processing, a Kubernetes Job, docker run)
#   SUBCOMMAND [args]     any other embedkit subcommand: info, encode, invoke, ...
#   healthcheck           exit 0 when GET /ping on the local server answers 200 (the image HEALTHCHECK)
#   PROGRAM [args]        anything that is not an embedkit subcommand runs as is (python app.py, sh)
#   (no arguments)        serve
#
# EMBEDKIT_ENTRYPOINT_DRY_RUN=1 prints the command instead of running it.
set -eu

# Inside a container the server must listen on every interface; outside one embedkit binds 127.0.0.1.
export EMBEDKIT_HOST="${EMBEDKIT_HOST:-0.0.0.0}"
# No downloads at run time: models are baked in or mounted.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

run() {
    if [ -n "${EMBEDKIT_ENTRYPOINT_DRY_RUN:-}" ]; then
        echo "$*"
        exit 0
    fi
    exec "$@"
}

healthcheck() {
    port="${EMBEDKIT_PORT:-${SAGEMAKER_BIND_TO_PORT:-8080}}"
    exec python3 -c '
import sys, urllib.request
try:
    with urllib.request.urlopen("http://127.0.0.1:%s/ping" % sys.argv[1], timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as exc:
    print("unhealthy: %s" % exc, file=sys.stderr)
    sys.exit(1)
' "$port"
}

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    healthcheck)
        healthcheck
        ;;
    serve | embed | encode | info | invoke)
        run embedkit "$@"
        ;;
    -*)
        run embedkit "$@"
        ;;
    */*)
        run "$@"
        ;;
    *)
        # A program on PATH runs as is; any other word is an embedkit subcommand.
        if command -v "$1" >/dev/null 2>&1; then
            run "$@"
        fi
        run embedkit "$@"
        ;;
esac
