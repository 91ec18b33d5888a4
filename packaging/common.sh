# Shared by build-deb.sh and build-rpm.sh (sourced, run from the repository root).

# The one place the version comes from.
pgherd_version() {
    /usr/bin/python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'
}

# Reproducible builds: timestamps are the last commit's (now, outside git).
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
    export SOURCE_DATE_EPOCH
fi

# SOURCE_DATE_EPOCH as date(1) prints it with the format flag $1.
build_date() {
    LC_ALL=C date -u "$1" -d "@$SOURCE_DATE_EPOCH"
}

# Install the Debian packages named in "$@" that are missing (apt-get, as root).
need_debs() {
    missing=
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
            || missing="$missing $pkg"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "missing build tools:$missing (install them with apt-get as root)" >&2
        exit 1
    fi
    echo "installing build tools:$missing"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends $missing >/dev/null; }
}

# Copy what the packages are built from into $1 (the working tree as it is, not a commit).
stage_sources() {
    tar -cf - --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' \
        pyproject.toml README.md prefork workers ipc etc packaging | tar -C "$1" -xf -
}

# Python builds must not see a developer's virtualenv or Python settings.
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME PYTHONDONTWRITEBYTECODE PIP_REQUIRE_VIRTUALENV
