#!/bin/sh
# Run by the image build (bentofile docker.setup_script), as root, before `USER bentoml`: creates
# the folder of the embedded defaults (INFANTINO_HOME: SQLite registry, artifacts, feedback store)
# owned by the non-root `bentoml` user, so a volume mounted there (docker or podman named volume)
# starts with that owner and the service can write into it.
set -eu
home="${INFANTINO_HOME:-/home/bentoml/infantino}"
mkdir -p "$home"
chown bentoml:bentoml "$home"
