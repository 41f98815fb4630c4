#!/usr/bin/env bash
# Proves the README's Raspberry Pi install on Debian 12 (bookworm), the base of Raspberry Pi OS
# Bookworm: apt's numpy, OpenCV and SciPy, a --system-site-packages venv from the system Python,
# and then the pip command exactly as the README's "On a Raspberry Pi" section documents it.
# A pip that put numpy 2 in that venv would break every apt-built extension that the venv sees
# (picamera2's simplejpeg on a Pi; here scipy and cv2), so after the install this checks that
# numpy is still apt's 1.24, that those extensions import and work, that `device-agent assess`
# works, and that the whole test suite passes with the versions pip chose.
#
# Off a Pi the `pi` extra (picamera2, which needs libcamera) cannot install, so the README's
# command runs with the `dev` extra (the test tools) in its place; all else is the README's.
# Uses apt through sudo when not root; the venv is .venv-pi/, made afresh on every run.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv-pi
system_python=/usr/bin/python3
system_site=/usr/lib/python3/dist-packages
readme=$root/README.md

fail() {
    echo "pi-check: FAIL: $*" >&2
    exit 1
}
step() { echo "pi-check: $*"; }

# shellcheck source=/dev/null
. /etc/os-release
if [ "${ID:-}" != debian ] || [ "${VERSION_ID:-}" != 12 ]; then
    fail "needs Debian 12 (bookworm), the base of Raspberry Pi OS Bookworm; this is ${PRETTY_NAME:-unknown}"
fi

# What the tests need (Mosquitto, systemd-analyze), for the system Python.
PYTHON=$system_python bash "$root/tools/system-deps.sh"
need=()
for pkg in python3-venv python3-numpy python3-opencv python3-scipy python3-pil; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        need+=("$pkg")
    fi
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    step "installing system packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
apt_numpy=$(dpkg-query -W -f='${Version}' python3-numpy)  # e.g. 1:1.24.2-1+deb12u1
apt_numpy=${apt_numpy#*:}
apt_numpy=${apt_numpy%%-*}
case $apt_numpy in
    1.24.*) ;;
    *) fail "apt's python3-numpy is $apt_numpy, not Bookworm's 1.24.x: not the system this checks" ;;
esac

# The README's pip line, run with this checkout, this venv and the dev extra in place of pi.
readme_pip=$(sed -n '/^## On a Raspberry Pi/,/^## /p' "$readme" | grep -E '/opt/device-agent/venv/bin/pip install' || true)
[ "$(printf '%s\n' "$readme_pip" | grep -c .)" -eq 1 ] \
    || fail "README.md's \"On a Raspberry Pi\" section must hold exactly one '/opt/device-agent/venv/bin/pip install' line; found: ${readme_pip:-none}"
case $readme_pip in
    *"[pi]"*) ;;
    *) fail "README.md's Pi install does not install the pi extra: $readme_pip" ;;
esac
pip_command=${readme_pip#sudo }
pip_command=${pip_command//\/opt\/device-agent\/venv/$venv}
pip_command=${pip_command//\/path\/to\/device-agent/$root}
pip_command=${pip_command//\[pi\]/[dev]}

rm -rf "$venv"
step "venv: $system_python -m venv --system-site-packages $venv"
"$system_python" -m venv --system-site-packages "$venv"
step "README's install (dev extra for pi): $pip_command"
(cd "$root" && eval "$pip_command") || fail "the README's pip install failed: $pip_command"
py=$venv/bin/python

step "the device's install carries neither the simulator nor the gateway"
(cd / && "$py" -c 'import importlib.util as u, sys
found = [m for m in ("sim", "clinic_gateway", "pydicom") if u.find_spec(m)]
sys.exit(f"installed on the device: {found}" if found else 0)') \
    || fail "the README's device install brought development or clinic packages"
# The tests run the simulator and the reference gateway: separate distributions, installed
# here for the tests only (never on a device), with the same constraints.
step "for the tests only: the simulator and the gateway"
"$venv/bin/pip" install --quiet -c "$root/deploy/pi/constraints-bookworm.txt" \
    "$root/clinic_gateway" "$root/sim" || fail "the simulator and the gateway do not install"

step "numpy must still be apt's $apt_numpy from $system_site"
numpy_seen=$("$py" -c 'import numpy; print(numpy.__version__, numpy.__file__)') \
    || fail "numpy does not import in the venv"
[ "$numpy_seen" = "$apt_numpy $system_site/numpy/__init__.py" ] \
    || fail "pip replaced the system numpy: the venv has numpy $numpy_seen, expected apt's $apt_numpy from $system_site"

step "apt's SciPy extensions must import and work"
"$py" - "$system_site" <<'EOF' || fail "apt's SciPy does not work with the venv's numpy (see the error above)"
import sys

import numpy as np
import scipy
import scipy.linalg
import scipy.ndimage

if not scipy.__file__.startswith(sys.argv[1]):
    sys.exit(f"scipy comes from {scipy.__file__}, not apt's {sys.argv[1]}")
smooth = scipy.ndimage.gaussian_filter(np.eye(8), 1.0)
assert abs(float(smooth.sum()) - 8.0) < 1e-6, smooth.sum()
assert np.allclose(scipy.linalg.inv(2 * np.eye(3)), 0.5 * np.eye(3))
print("scipy", scipy.__version__, "from", scipy.__file__)
EOF

step "Debian's own cv2 (loaded by path) must import and work"
# By path: the venv's opencv-python-headless wheel shadows it on import.
"$py" - "$system_site" <<'EOF' || fail "apt's cv2 does not work with the venv's numpy (see the error above)"
import glob
import importlib.util
import sys

import numpy as np

paths = glob.glob(f"{sys.argv[1]}/cv2*.so")
if len(paths) != 1:
    sys.exit(f"expected one apt cv2 module in {sys.argv[1]}, found {paths}")
spec = importlib.util.spec_from_file_location("cv2", paths[0])
cv2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cv2)
blurred = cv2.GaussianBlur(np.full((16, 16), 100, np.uint8), (5, 5), 0)
assert int(blurred[8, 8]) == 100, blurred[8, 8]
print("apt cv2", cv2.__version__, "from", paths[0])
EOF

step "device-agent assess on tests/data"
images=("$root"/tests/data/*.jpg)
assessed=$("$venv/bin/device-agent" assess "${images[@]}" --json) \
    || fail "device-agent assess exited $? on ${images[*]}"
"$py" - "${#images[@]}" "$assessed" <<'EOF' || fail "device-agent assess did not print one JSON object per image: $assessed"
import json
import sys

lines = sys.argv[2].splitlines()
assert len(lines) == int(sys.argv[1]), f"{len(lines)} lines for {sys.argv[1]} images"
for line in lines:
    result = json.loads(line)
    assert result["verdict"] in {"accept", "retake"}, result
    assert {"path", "reasons", "scores"} <= result.keys(), result
EOF
echo "$assessed"

step "the whole test suite in the venv"
(cd "$root" && "$py" -m pytest -q) || fail "the test suite fails with the Pi's versions"

versions=$("$py" -c 'import importlib.metadata as m
print(", ".join(f"{n} {m.version(n)}" for n in ("numpy", "scipy", "opencv-python-headless", "colour-science")))')
step "OK: the README's Pi install keeps apt's numpy $apt_numpy and passes ($versions)"
