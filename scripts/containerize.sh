#!/usr/bin/env bash
# Containerize the torch-free Bento for real and check it: `make container` (or this script).
#
#  1. base image: a registry's python:3.11-slim when a pull answers within PULL_TIMEOUT seconds,
#     otherwise one built here from Debian packages (scripts/base-image.sh; skipped if it exists).
#     BASE=registry|local forces one. A registry base gets a thin layer: UV_NO_CACHE=1 and this
#     machine's extra CA certificates (/usr/local/share/ca-certificates: re-signing proxies).
#  2. the Bento: `make build` when the bundled models are missing from BentoML's model store (else `infantino bundle`,
#     which completes bundles an older version made)
#     (BUILD=1 forces it), then the same bentofile.yaml with docker.base_image set to that base.
#  3. `bentoml containerize --backend buildah` (BUILDAH_ISOLATION=chroot).
#  4. `podman run` on a free loopback port, INFANTINO_HOME on a fresh named volume, an admin
#     token; waits for /readyz, POSTs a drawn face to /predict (7 labels), checks the user is not
#     root, posts feedback and runs /admin/update, restarts on the same volume to check that
#     the state persisted, stops the container.
#  5. writes bench/results/containerize.json (sizes, build and cold-start seconds, the answers).
#
# Needs: podman, buildah (and mmdebstrap for the local base): apt-get install -y podman buildah
# mmdebstrap runc. Runs as root here; podman's runtime is runc with explicit ulimits (crun and
# --cgroups=disabled fail on this machine: PODMAN_RUNTIME / PODMAN_ULIMITS override that).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BIN=$VENV/bin
BASE=${BASE:-auto}
PULL_TIMEOUT=${PULL_TIMEOUT:-30}
REGISTRY_BASE_IMAGE=${REGISTRY_BASE_IMAGE:-docker.io/library/python:3.11-slim}
. /etc/os-release
LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/infantino-base:${VERSION_CODENAME:-bookworm}}
IMAGE_NAME=${IMAGE_NAME:-infantino}
VOLUME=${VOLUME:-infantino-state-check}
OUT=${OUT:-bench/results/containerize.json}
PODMAN_RUNTIME=${PODMAN_RUNTIME:-runc}
read -r -a ULIMITS <<< "${PODMAN_ULIMITS:---ulimit nofile=20000:20000 --ulimit nproc=8192:8192}"
TOKEN=${INFANTINO_ADMIN_TOKEN:-check-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')}
FEEDBACK_ITEMS=${FEEDBACK_ITEMS:-24}
export PATH="$PWD/$BIN:$PATH" BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

log() { printf '\n== %s\n' "$*" >&2; }
now() { date +%s.%N; }
mb() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f", $1/1e6}'; }
work=$(mktemp -d)
container=""
cleanup() { [ -n "$container" ] && podman rm -f "$container" >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT

# ---- 1. base image ------------------------------------------------------------------------------
# IMAGE=localhost/infantino:TAG reuses a built image: steps 1-3 are skipped (their numbers are null)
if [ -n "${IMAGE:-}" ]; then
  image=$IMAGE BASE=reused bento="(the Bento of $IMAGE)"
  base_image=$(podman image inspect --format '{{index .Annotations "org.opencontainers.image.base.name"}}' "$IMAGE")
  base_seconds=null bento_seconds=null build_seconds=null
else
if [ "$BASE" = auto ]; then
  log "trying $REGISTRY_BASE_IMAGE (${PULL_TIMEOUT}s)"
  if podman image exists "$REGISTRY_BASE_IMAGE" || timeout "$PULL_TIMEOUT" podman pull -q "$REGISTRY_BASE_IMAGE" >/dev/null 2>"$work/pull.err"; then
    BASE=registry
  else
    echo "no registry: $(tail -1 "$work/pull.err" 2>/dev/null)" >&2
    BASE=local
  fi
fi
t0=$(now)
if [ "$BASE" = registry ]; then
  podman image exists "$REGISTRY_BASE_IMAGE" || podman pull -q "$REGISTRY_BASE_IMAGE" >/dev/null
  # a thin layer on the registry image: UV_NO_CACHE (without BuildKit, buildah, BentoML's cache
  # mount is not used and uv's cache would stay in the image), and this machine's CA certificates
  # if it has extra ones (downloads through a re-signing proxy: the image build must trust it too)
  base_image=localhost/infantino-base:registry-$(printf '%s' "${REGISTRY_BASE_IMAGE##*/}" | tr -c 'A-Za-z0-9_.-' '-')
  log "$REGISTRY_BASE_IMAGE + UV_NO_CACHE (+ this machine's CA certificates) -> $base_image"
  mkdir "$work/ca"
  cp /usr/local/share/ca-certificates/*.crt "$work/ca/" 2>/dev/null || true
  cat > "$work/ca/Containerfile" <<CONTAINERFILE
FROM $REGISTRY_BASE_IMAGE
COPY . /usr/local/share/ca-certificates/
RUN rm -f /usr/local/share/ca-certificates/Containerfile && update-ca-certificates
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1 UV_NO_CACHE=1
CONTAINERFILE
  buildah bud -q --isolation chroot -t "$base_image" "$work/ca" >/dev/null
else
  log "local base image from Debian packages: $LOCAL_BASE_IMAGE"
  podman image exists "$LOCAL_BASE_IMAGE" && base_built_now=false
  scripts/base-image.sh "$LOCAL_BASE_IMAGE"
  base_image=$LOCAL_BASE_IMAGE
fi
base_seconds=$(echo "$(now) - $t0" | bc)

# ---- 2. the Bento -------------------------------------------------------------------------------
t0=$(now)
if [ "${BUILD:-0}" = 1 ] || ! bentoml models get infantino-expression-backbone:latest >/dev/null 2>&1 \
   || ! bentoml models get infantino-expression-head:latest >/dev/null 2>&1; then
  log "make build (bootstrap, bundle, bentoml build)"
  make build >&2
else  # bundles made by an older InfantinO (no ONNX export, no embeddings) are made again; complete ones are kept
  "$BIN/infantino" bundle >&2
fi
log "bentoml build with docker.base_image=$base_image"
"$BIN/python" - "$base_image" "$work/bentofile.yaml" <<'PY'
import sys, yaml
base, out = sys.argv[1], sys.argv[2]
spec = yaml.safe_load(open("bentofile.yaml"))
docker = spec.setdefault("docker", {})
docker.pop("distro", None)          # a base image replaces distro; python_version still names uv's venv python
docker["base_image"] = base
yaml.safe_dump(spec, open(out, "w"), sort_keys=False)
PY
bento=$(bentoml build -f "$work/bentofile.yaml" -o tag 2>"$work/build.err" | sed -n 's/^__tag__://p' | tail -1)
[ -n "$bento" ] || { cat "$work/build.err" >&2; exit 1; }
bento_seconds=$(echo "$(now) - $t0" | bc)
image="localhost/$IMAGE_NAME:${bento#*:}"
echo "Bento $bento" >&2

# ---- 3. containerize ----------------------------------------------------------------------------
log "bentoml containerize --backend buildah $bento -> $image"
t0=$(now)
bentoml containerize --backend buildah -t "$IMAGE_NAME:${bento#*:}" "$bento" >&2
build_seconds=$(echo "$(now) - $t0" | bc)
podman image exists "$image" || { echo "containerize made no $image" >&2; exit 1; }
fi

# ---- 4. run and check ---------------------------------------------------------------------------
port=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
podman volume create "$VOLUME" >/dev/null
home=$(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | sed -n 's/^INFANTINO_HOME=//p')
home=${home:-/home/bentoml/infantino}
wait_ready() {  # until /readyz answers 200; fails at once if the container stops, or after 600 s
  local start=$SECONDS
  until "$BIN/python" scripts/container_check.py ready "$url" 5 >/dev/null 2>&1; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$container" 2>/dev/null)" != true ] || [ $((SECONDS - start)) -gt 600 ]; then
      echo "the container stopped or never became ready; its log:" >&2
      podman logs --tail 40 "$container" >&2
      return 1
    fi
  done
}
run() {  # the way to run it: non-root image user, state on the volume, URLs from the environment
  podman run -d --runtime "$PODMAN_RUNTIME" "${ULIMITS[@]}" -p "127.0.0.1:$port:3000" \
    -v "$VOLUME:$home" -e INFANTINO_ADMIN_TOKEN="$TOKEN" \
    ${INFANTINO_TRACKING_URI:+-e INFANTINO_TRACKING_URI} ${INFANTINO_QUEUE_URL:+-e INFANTINO_QUEUE_URL} \
    "$image" serve
}
# No registry init step: the service opens its embedded SQLite registry under a file lock
# (registry/store.py), so its processes no longer race on MLflow's migrations on a fresh volume.
log "podman run on $url (volume $VOLUME at $home)"
t0=$(now)
container=$(run)
wait_ready || exit 1
cold_start=$(echo "$(now) - $t0" | bc)
echo "ready after $cold_start s" >&2
user=$(podman exec "$container" id)
echo "user: $user" >&2
"$BIN/python" scripts/container_check.py predict "$url" > "$work/predict.json" || { cat "$work/predict.json" >&2; podman logs --tail 50 "$container" >&2; exit 1; }
echo "predict: $(cut -c1-400 "$work/predict.json")" >&2
log "online update: $FEEDBACK_ITEMS x /feedback, then /admin/update"
"$BIN/python" scripts/container_check.py online "$url" "$TOKEN" "$FEEDBACK_ITEMS" > "$work/online.json" \
  || { cat "$work/online.json" >&2; podman logs --tail 50 "$container" >&2; exit 1; }
echo "online: $(cut -c1-600 "$work/online.json")" >&2
"$BIN/python" scripts/container_check.py model "$url" > "$work/model_before.json"
state_files=$(podman exec "$container" sh -c "ls -ln $home" | tail -n +2 | awk '{print $3":"$4" "$9}' | paste -sd, -)
podman stop -t 20 "$container" >/dev/null && podman rm "$container" >/dev/null
log "restart on the same volume"
t0=$(now)
container=$(run)
wait_ready || exit 1
warm_start=$(echo "$(now) - $t0" | bc)
"$BIN/python" scripts/container_check.py model "$url" > "$work/model_after.json"
podman stop -t 20 "$container" >/dev/null && podman rm "$container" >/dev/null
container=""

# ---- 5. the record ------------------------------------------------------------------------------
"$BIN/python" - "$OUT" "$work" <<PY
import json, platform, sys, time
null, true, false = None, True, False
w = sys.argv[2]
load = lambda name: json.load(open(f"{w}/{name}.json"))
predict, online = load("predict"), load("online")
before, after = load("model_before")["model"], load("model_after")["model"]
def served(m):
    if not isinstance(m, dict):
        return m
    return {"head": m.get("head"), "backbone": m.get("backbone"), "queue": m.get("queue"), "tracking_uri": m.get("tracking_uri")}
record = {
    "what": "scripts/containerize.sh: bentoml containerize (buildah) of the torch-free Bento, podman run, /readyz, /predict",
    "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores (shared), podman runtime $PODMAN_RUNTIME",
    "base": "$BASE", "base_image": "$base_image", "base_image_mb": float("$(mb "$base_image")"),
    "base_image_seconds": $base_seconds and round($base_seconds, 1),
    "base_image_built_now": ${base_built_now:-true} if "$BASE" != "reused" else False,
    "bento": "$bento", "bento_build_seconds": $bento_seconds and round($bento_seconds, 1),
    "image": "$image", "image_mb": float("$(mb "$image")"), "containerize_seconds": $build_seconds and round($build_seconds, 1),
    "tracking_uri": "${INFANTINO_TRACKING_URI:-}" or "embedded (SQLite on the state volume)",
    "cold_start_seconds": round($cold_start, 2),
    "cold_start_note": "from podman run to the first /readyz 200, on a fresh (empty) state volume",
    "restart_seconds": round($warm_start, 2),
    "container_user": "$user",
    "state_volume": {"mounted_at": "$home", "files_after_first_run": "$state_files".split(",")},
    "predict": predict,
    "online_update": online,
    "model_before_restart": served(before),
    "model_after_restart": served(after),
}
json.dump(record, open(sys.argv[1], "w"), indent=2)
print(json.dumps({k: record[k] for k in ("base", "base_image_mb", "image_mb", "containerize_seconds", "cold_start_seconds", "restart_seconds", "container_user")}, indent=2))
PY
echo "wrote $OUT" >&2
