#!/usr/bin/env bash
# Builds the container base image from Debian packages alone (no container registry needed):
# mmdebstrap --variant=minbase of this machine's Debian release with python3, python3-venv,
# python3-pip, ca-certificates, curl and passwd (useradd, for BentoML's `bentoml` user), the
# machine's extra CA certificates (/usr/local/share/ca-certificates: downloads may go through a
# re-signing proxy), and no EXTERNALLY-MANAGED marker (BentoML's build pip-installs uv into the
# system python). Imported with `podman import` as $BASE_IMAGE. Skips if the image exists.
#   scripts/base-image.sh [IMAGE]      (default localhost/infantino-base:<release>)
set -euo pipefail
. /etc/os-release
SUITE=${DEBIAN_SUITE:-${VERSION_CODENAME:-bookworm}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
IMAGE=${1:-${BASE_IMAGE:-localhost/infantino-base:$SUITE}}

if podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists; skipping" >&2
  exit 0
fi
for tool in mmdebstrap podman; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y mmdebstrap podman buildah" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tarball=$work/rootfs.tar
mmdebstrap --variant=minbase --mode=auto \
  --include=python3,python3-venv,python3-pip,ca-certificates,curl,passwd \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"; fi' \
  --customize-hook='chroot "$1" update-ca-certificates' \
  --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
  --customize-hook='printf "%s\n" "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true\"; };" "APT::Update::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true\"; };" "Dir::Cache::pkgcache \"\"; Dir::Cache::srcpkgcache \"\";" > "$1"/etc/apt/apt.conf.d/docker-clean' \
  "$SUITE" "$tarball" \
  "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main"

# uv (BentoML's installer) bundles its own CA roots unless told to use the system's: with
# UV_NATIVE_TLS and SSL_CERT_FILE it trusts the certificates installed above. UV_NO_CACHE: without
# BuildKit (buildah) BentoML's cache mount is not used, and uv's cache would stay in the image.
# docker-clean (above, as in Docker's official Debian images): apt keeps no .deb files in layers.
podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV UV_NATIVE_TLS=1' \
  --change 'ENV UV_NO_CACHE=1' \
  --change 'CMD ["/bin/bash"]' \
  "$tarball" "$IMAGE" >/dev/null
echo "built $IMAGE from Debian $SUITE packages" >&2
