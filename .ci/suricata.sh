#!/usr/bin/env bash
# Install Suricata 7 from Debian's bookworm-backports suite for the differential tests
# (tests/test_suricata_diff.py). /etc/apt is left alone: the backports source list and the
# package lists it fetches live in a folder of their own, and the machine's own Debian mirror
# is reused. Usage: .ci/suricata.sh [FOLDER]   (as root)
set -euo pipefail
dir=${1:-/var/tmp/microseg-backports}
mkdir -p "$dir/lists/partial"
mirror=""
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
    mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" \
    >"$dir/backports.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$dir/backports.list"
    -o "Dir::Etc::SourceParts=/etc/apt/sources.list.d"
    -o "Dir::State::Lists=$dir/lists"
)
apt-get "${apt_opts[@]}" update -qq
DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y -qq \
    --no-install-recommends -t bookworm-backports suricata >/dev/null
suricata -V
