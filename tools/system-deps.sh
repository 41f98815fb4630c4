#!/usr/bin/env bash
# Installs the system packages the demo and the tests need, only when they are missing:
# Mosquitto (the real broker the tests start on a free loopback port) with what builds its
# dermascope_guard plugin (gcc, mosquitto-dev, libmosquitto-dev, libssl-dev), Python's venv,
# systemd-analyze (the unit-file checks) and dicom3tools (dciodvfy, the reference validator the
# DICOM export tests run on every exported file), chromium and chromium-driver (the GP's page
# in a real browser).
# Uses apt, through sudo when not root. Touches no broker configuration: the tests and the
# demo write their own config into a temporary folder and never use the system service.
set -euo pipefail

need=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    need+=(mosquitto)
fi
# The broker's dermascope_guard plugin (deploy/mosquitto/dermascope_guard.c) is compiled
# by the tests as clinic IT compiles it: a C compiler and Mosquitto's plugin headers.
if ! command -v cc >/dev/null 2>&1; then
    need+=(gcc)
fi
if [ ! -f /usr/include/mosquitto_plugin.h ]; then
    need+=(mosquitto-dev)
fi
if [ ! -f /usr/include/mosquitto.h ]; then
    need+=(libmosquitto-dev)
fi
if [ ! -f /usr/include/openssl/x509.h ]; then
    need+=(libssl-dev)
fi
# systemd-analyze checks the unit file (minimal images may lack systemd).
if ! command -v systemd-analyze >/dev/null 2>&1; then
    need+=(systemd)
fi
# dciodvfy (dicom3tools) validates every exported DICOM object in tests/test_dicom_validator.py.
if ! command -v dciodvfy >/dev/null 2>&1; then
    need+=(dicom3tools)
fi
# The GP's page is tested in a real browser (tests/test_web_browser.py): Debian's chromium
# and its chromedriver, which selenium drives without downloading anything.
if [ ! -x /usr/bin/chromium ]; then
    need+=(chromium)
fi
if [ ! -x /usr/bin/chromedriver ]; then
    need+=(chromium-driver)
fi
# Orthanc and its DICOMweb plugin: the PACS the PACS-delivery tests and `make demo` start on
# free loopback ports with their own config and storage (sim/orthanc.py); never the system's.
if [ ! -x /usr/sbin/Orthanc ] && ! command -v Orthanc >/dev/null 2>&1; then
    need+=(orthanc)
fi
if [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
        && [ ! -e /usr/lib/orthanc/libOrthancDicomWeb.so ]; then
    need+=(orthanc-dicomweb)
fi
py=${PYTHON:-python3}
if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    need+=("python${ver}-venv")
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian starts the packaged broker on port 1883; nothing here needs it.
# Debian starts the packaged Orthanc on ports 8042 and 4242 too; nothing here needs it either.
