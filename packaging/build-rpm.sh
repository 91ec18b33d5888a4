#!/bin/sh
# Build dist/pgherd-<version>-1.<arch>.rpm (make rpm) with rpmbuild, also on Debian (its rpm
# package has no Fedora macros; the spec needs none). The version is pyproject.toml's.
# RPM_PYTHON picks the target distribution's Python (default 3.11), e.g. RPM_PYTHON=3.12.
# Installs the Debian build tools it lacks with apt-get when run as root.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. packaging/common.sh

if command -v dpkg-query >/dev/null; then
    need_debs rpm python3 python3-venv
fi
command -v rpmbuild >/dev/null || { echo "rpmbuild is missing" >&2; exit 1; }

version=$(pgherd_version)
top=$root/build/rpm
rm -rf "$top"
mkdir -p "$top/src" dist
# Built from a copy of the working tree, so the build's own files stay out of it.
stage_sources "$top/src"
echo "building pgherd $version rpm for Python ${RPM_PYTHON:-3.11}"
rpmbuild -bb --nodeps \
    --define "_topdir $top" \
    --define "srcdir $top/src" \
    --define "pyver ${RPM_PYTHON:-3.11}" \
    --define "_source_date_epoch_from_changelog 0" \
    --define "use_source_date_epoch_as_buildtime 1" \
    --define "_buildhost pgherd-build" \
    packaging/rpm/pgherd.spec > "$top/build.log" 2>&1 || {
    tail -n 60 "$top/build.log" >&2
    echo "rpmbuild failed; full log: build/rpm/build.log" >&2
    exit 1
}
rm -f dist/pgherd-*.rpm
for rpm in "$top"/RPMS/*/pgherd-"$version"-*.rpm; do
    mv "$rpm" dist/
    echo "dist/$(basename "$rpm")"
done
