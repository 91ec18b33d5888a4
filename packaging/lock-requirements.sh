#!/bin/sh
# Re-pin packaging/requirements.txt: install pyproject.toml's dependencies (binary wheels only)
# into a throwaway venv of the build Python and freeze it.
set -eu
cd "$(dirname "$0")/.."
PY=${PGHERD_BUILD_PYTHON:-/usr/bin/python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
deps=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
echo "$deps" > "$tmp/deps.txt"
"$tmp/venv/bin/pip" install --quiet --only-binary=:all: -r "$tmp/deps.txt"
{
    sed -n '/^#/p' packaging/requirements.txt
    "$tmp/venv/bin/pip" freeze --all --exclude pip --exclude setuptools --exclude wheel | LC_ALL=C sort -f
} > "$tmp/requirements.txt"
mv "$tmp/requirements.txt" packaging/requirements.txt
echo "packaging/requirements.txt:"; grep -v '^#' packaging/requirements.txt
