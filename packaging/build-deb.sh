#!/bin/sh
# Build dist/pgherd_<version>_<arch>.deb (make deb). The version is pyproject.toml's.
# Installs the Debian build tools it lacks with apt-get when run as root.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. packaging/common.sh

need_debs dpkg-dev debhelper dh-virtualenv python3 python3-venv

version=$(pgherd_version)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
stage=build/deb/pgherd-$version
rm -rf build/deb
mkdir -p "$stage" dist
stage_sources "$stage"
cp -RL packaging/debian "$stage/debian"
# debian/changelog is generated: the version lives in pyproject.toml only.
cat > "$stage/debian/changelog" <<CHANGELOG
pgherd ($version) unstable; urgency=medium

  * pgherd $version, packaged from the pgherd repository.

 -- $(sed -n 's/^Maintainer: //p' packaging/debian/control)  $(build_date -R)
CHANGELOG

echo "building pgherd $version for $arch in $stage"
(cd "$stage" && dpkg-buildpackage -us -uc -b) > build/deb/build.log 2>&1 || {
    tail -n 60 build/deb/build.log >&2
    echo "dpkg-buildpackage failed; full log: build/deb/build.log" >&2
    exit 1
}
rm -f dist/pgherd_*.deb
mv "build/deb/pgherd_${version}_${arch}.deb" dist/
echo "dist/pgherd_${version}_${arch}.deb"
