"""The service packages (packaging/): built, linted, inspected, installed, run, removed.

* Static checks of the sources (no build): the pinned dependency lock satisfies pyproject.toml,
  the man page covers the CLI, the unit has the settings the service needs and the packaged
  pgherd.ini is valid and keeps every path it writes inside the unit's writable directories.
* ``make deb`` and ``make rpm`` run once per test run (session fixture ``packages``; a file
  lock and a stamp naming the run make xdist workers share one build). Both install the
  Debian build tools they lack with apt-get (CI is root on a disposable Debian machine).
* The .deb: lintian shows no error and no warning (accepted ones are overridden, with their
  reason, in packaging/debian/pgherd.lintian-overrides); its files, conffiles, dependencies
  and maintainer scripts.
* The .rpm: ``rpm -qpl``/``-qpc``/``--scripts``/``--requires``, file modes and owners, and its
  payload runs (``pgherd --version``) with the venv's own interpreter.
* The .deb's whole life on this machine (root only): ``apt-get install``; the user, files and
  modes; ``systemd-analyze verify``; the unit's ExecStart run by hand the way systemd would
  (User=, LimitNOFILE=, UMask=, NoNewPrivileges=, RuntimeDirectory=, LogsDirectory=,
  NOTIFY_SOCKET) serves queries over TCP and the Unix socket and sends READY=1; ExecReload
  applies an edited configuration (RELOADING=1, READY=1); logrotate rotates and pgherd reopens
  its log; KillSignal stops it; ``apt-get remove`` keeps the conffiles, ``purge`` removes them
  and keeps the user.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import grp
import json
import os
import pwd
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import psycopg
import pytest
from packaging.requirements import Requirement

from tests.helpers import REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.timeout(900)

PACKAGING = REPO_ROOT / "packaging"
UNIT_SOURCE = PACKAGING / "systemd" / "pgherd.service"
LOCK_PATH = "/tmp/pgherd-packaging.lock"
STAMP = REPO_ROOT / "build" / "packages-test.json"
CONFFILES = ("/etc/pgherd/pgherd.ini", "/etc/pgherd/userlist.txt", "/etc/logrotate.d/pgherd")
BUILD_TOOLS = ("dpkg-dev", "debhelper", "dh-virtualenv", "python3-venv", "rpm")
CHECK_TOOLS = ("lintian", "logrotate", "systemd")
GRAFANA = tuple("/usr/share/pgherd/grafana/" + p.name
                for p in sorted((PACKAGING / "grafana").glob("*.json")))


def _version() -> str:
    import tomllib

    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def _run(argv: list[str], timeout: float = 300, check: bool = True,
         **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError("%s exited %d\n--- stdout\n%s\n--- stderr\n%s" % (
            shlex.join(argv), proc.returncode, proc.stdout[-6000:], proc.stderr[-6000:]))
    return proc


def _parse_unit(text: str) -> dict[str, str]:
    """``Section.Key -> value`` (the last assignment wins; comments and blanks skipped)."""
    out: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out[f"{section}.{key.strip()}"] = value.strip()
    return out


def _exec_argv(value: str, mainpid: int | None = None) -> list[str]:
    """An Exec*= line as systemd runs it: prefixes dropped, $MAINPID substituted."""
    value = value.lstrip("-@:+!")
    if mainpid is not None:
        value = value.replace("${MAINPID}", str(mainpid)).replace("$MAINPID", str(mainpid))
    return shlex.split(value)


def _ini_main(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"),
                                       strict=False)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read(path)
    return dict(parser["pgbouncer"])


def _deb_state(package: str = "pgherd") -> str:
    proc = _run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _missing_debs(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True,
                              text=True)
        if proc.stdout.strip() != "install ok installed":
            missing.append(name)
    return missing


def _need_debs(names: tuple[str, ...]) -> None:
    """Install missing Debian packages as the build scripts do, or skip saying why not."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("the packages are built and checked on Debian (no dpkg-query here)")
    missing = _missing_debs(names)
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs %s: not installed, and apt-get is not usable here (not root)"
                    % " ".join(missing))
    _run(["sh", "-c", '. packaging/common.sh && need_debs "$@"', "need_debs", *missing],
         cwd=REPO_ROOT, timeout=600)


@contextlib.contextmanager
def _packaging_lock() -> Iterator[None]:
    """One builder/installer at a time across xdist workers (and concurrent runs)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# static checks of the packaging sources
# --------------------------------------------------------------------------------------


def test_pinned_requirements_satisfy_pyproject():
    import tomllib

    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    pins: dict[str, str] = {}
    for line in (PACKAGING / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not pinned with ==: {line}"
        pins[req.name.lower().replace("_", "-").replace(".", "-")] = spec[0].version
    for dep in deps:
        name = dep.name.lower().replace("_", "-").replace(".", "-")
        assert name in pins, (
            f"pyproject dependency {dep} is not in packaging/requirements.txt: "
            "run packaging/lock-requirements.sh")
        assert dep.specifier.contains(pins[name], prereleases=True), (
            f"packaging/requirements.txt pins {dep.name}=={pins[name]}, pyproject wants "
            f"{dep}: run packaging/lock-requirements.sh")


def test_man_page_documents_the_command_line():
    """pgherd(1) is rendered from the CLI: every command and option is in it, and man(1)
    formats it without a warning."""
    import click

    from prefork.cli import main

    out = _run([sys.executable, str(PACKAGING / "manpage.py"),
                str(PACKAGING / "pgherd.1.in")]).stdout
    assert not re.search(r"@[A-Z]+@", out), "a placeholder left unfilled"
    page = out.replace("\\-", "-")
    ctx = click.Context(main)
    missing = [name for name in main.list_commands(ctx) if f".B {name}\n" not in page]
    for name in main.list_commands(ctx):
        for param in main.commands[name].params:
            for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
                if opt.startswith("-") and opt not in page:
                    missing.append(f"{name} {opt}")
    assert not missing, f"pgherd(1) lacks {missing}"
    if shutil.which("man"):
        page_file = REPO_ROOT / "build" / "pgherd.1.test"
        page_file.parent.mkdir(exist_ok=True)
        page_file.write_text(out)
        try:
            man = _run(["man", "--warnings", "-E", "UTF-8", "-l", str(page_file)],
                       env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8",
                            "MAN_DISABLE_SECCOMP": "1"})
        finally:
            page_file.unlink()
        assert not man.stderr.strip(), man.stderr
        assert "pgherd reload [OPTIONS] CONFIG" in man.stdout


def test_unit_settings():
    from prefork.settings import SETTINGS

    unit = _parse_unit(UNIT_SOURCE.read_text())
    expected = {
        "Service.Type": "notify",
        "Service.User": "pgherd",
        "Service.Group": "pgherd",
        "Service.ExecStart": "/usr/bin/pgherd run /etc/pgherd/pgherd.ini",
        "Service.ExecReload": "/bin/kill -HUP $MAINPID",
        "Service.KillSignal": "SIGINT",
        "Service.KillMode": "mixed",
        "Service.Restart": "on-failure",
        "Service.RuntimeDirectory": "pgherd",
        "Service.LogsDirectory": "pgherd",
        "Service.NoNewPrivileges": "yes",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.PrivateTmp": "yes",
        "Install.WantedBy": "multi-user.target",
    }
    assert {k: unit.get(k) for k in expected} == expected
    assert int(unit["Service.LimitNOFILE"]) >= 65536
    # A graceful stop may take shutdown_timeout; systemd must not SIGKILL before that.
    packaged = _ini_main(PACKAGING / "pgherd.ini")
    shutdown_timeout = float(packaged.get("shutdown_timeout",
                                          SETTINGS["shutdown_timeout"].default))
    assert float(unit["Service.TimeoutStopSec"]) > shutdown_timeout + 10
    # The watchdog must leave the master time to replace a hung worker itself.
    assert float(unit["Service.WatchdogSec"]) >= 2 * SETTINGS["heartbeat_timeout"].default
    # The commented default in the packaged file states the real default.
    text = (PACKAGING / "pgherd.ini").read_text()
    for name in ("shutdown_timeout", "heartbeat_timeout", "http_listen_port"):
        assert ";%s = %g" % (name, SETTINGS[name].default) in text, name


def test_packaged_config(tmp_path):
    """Valid as shipped, and every file pgherd writes is where the sandbox lets it write."""
    from prefork.config import load_config

    main = _ini_main(PACKAGING / "pgherd.ini")
    assert main["listen_addr"] == "127.0.0.1" and main["listen_port"] == "6432"
    assert main["auth_file"] == "/etc/pgherd/userlist.txt"
    unit = _parse_unit(UNIT_SOURCE.read_text())
    writable = ["/run/" + unit["Service.RuntimeDirectory"],
                "/var/log/" + unit["Service.LogsDirectory"]]
    for key in ("pidfile", "logfile", "unix_socket_dir"):
        path = main[key]
        assert any(path == d or path.startswith(d + "/") for d in writable), (
            f"{key} = {path} is outside the unit's writable directories {writable}")
    # Loaded as pgherd would, with the auth_file where the package puts it.
    ini = (PACKAGING / "pgherd.ini").read_text().replace(
        "/etc/pgherd/userlist.txt", str(tmp_path / "userlist.txt"))
    (tmp_path / "pgherd.ini").write_text(ini)
    shutil.copy(PACKAGING / "userlist.txt", tmp_path / "userlist.txt")
    config = load_config(str(tmp_path / "pgherd.ini"))
    assert not config.warnings, [str(w) for w in config.warnings]
    assert config.settings.auth_type == "scram-sha-256"
    assert not config.databases and not config.userlist


# --------------------------------------------------------------------------------------
# building (once per test run)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def packages() -> dict:
    """``make deb`` and ``make rpm``, once per run: {"deb": Path, "rpm": Path, ...}."""
    _need_debs(BUILD_TOOLS)
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or "pid%d" % os.getpid()
    version = _version()
    with _packaging_lock():
        try:
            stamp = json.loads(STAMP.read_text())
        except (OSError, ValueError):
            stamp = {}
        if stamp.get("run") == run_id:
            if "error" in stamp:  # another worker's build failed: do not try again
                pytest.fail(stamp["error"], pytrace=False)
            if all(Path(stamp[k]).exists() for k in ("deb", "rpm")):
                return {**stamp, "deb": Path(stamp["deb"]), "rpm": Path(stamp["rpm"])}
        STAMP.unlink(missing_ok=True)
        STAMP.parent.mkdir(exist_ok=True)
        built: dict = {"run": run_id, "version": version}
        for kind in ("deb", "rpm"):
            started = time.monotonic()
            try:
                _run(["make", "--no-print-directory", kind], cwd=REPO_ROOT, timeout=600)
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                STAMP.write_text(json.dumps({"run": run_id, "error": f"make {kind}: {exc}"}))
                raise
            built[kind + "_seconds"] = round(time.monotonic() - started, 1)
        arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
        rpm_arch = _run(["rpm", "--eval", "%{_arch}"]).stdout.strip()
        built["deb"] = str(REPO_ROOT / "dist" / f"pgherd_{version}_{arch}.deb")
        built["rpm"] = str(REPO_ROOT / "dist" / f"pgherd-{version}-1.{rpm_arch}.rpm")
        for kind in ("deb", "rpm"):
            assert Path(built[kind]).is_file(), f"make {kind} did not make {built[kind]}"
        STAMP.write_text(json.dumps(built))
    return {**built, "deb": Path(built["deb"]), "rpm": Path(built["rpm"])}


# --------------------------------------------------------------------------------------
# the .deb as a file
# --------------------------------------------------------------------------------------


def test_deb_lintian(packages):
    _need_debs(("lintian",))
    proc = _run(["lintian", "--pedantic", str(packages["deb"])], check=False, timeout=300)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert proc.returncode == 0 and not tags, (
        "lintian (accepted tags belong in packaging/debian/pgherd.lintian-overrides, with "
        "their reason):\n" + proc.stdout + proc.stderr)


def test_deb_contents(packages):
    deb = str(packages["deb"])
    fields = _run(["dpkg-deb", "-f", deb, "Package", "Version", "Architecture",
                   "Depends"]).stdout
    assert "Package: pgherd\n" in fields and f"Version: {packages['version']}\n" in fields
    depends = re.search(r"^Depends: (.*)$", fields, re.M).group(1)
    for dep in ("python3.", "adduser", "procps", "libc6"):
        assert dep in depends, depends
    listing = _run(["dpkg-deb", "-c", deb]).stdout
    paths = {line.split()[5].lstrip(".") for line in listing.splitlines()}
    for path in ("/usr/bin/pgherd", "/usr/lib/pgherd/bin/pgherd", "/usr/lib/pgherd/pyvenv.cfg",
                 "/etc/pgherd/pgherd.ini", "/etc/pgherd/userlist.txt", "/etc/logrotate.d/pgherd",
                 "/lib/systemd/system/pgherd.service", "/usr/share/man/man1/pgherd.1.gz",
                 "/usr/share/doc/pgherd/examples/pgherd.ini", "/usr/share/doc/pgherd/copyright",
                 "/usr/share/doc/pgherd/README.md.gz", "/usr/share/doc/pgherd/packaging.md.gz",
                 *GRAFANA):
        assert path in paths, f"{path} not in the .deb"
    assert any("/site-packages/gevent/" in p for p in paths)
    assert any(re.search(r"/site-packages/pgherd-[^/]+\.dist-info/", p) for p in paths)
    assert not [p for p in paths if "__pycache__" in p], "byte-code is compiled by postinst"
    for line in listing.splitlines():
        if line.endswith(("etc/pgherd/pgherd.ini", "etc/pgherd/userlist.txt")):
            assert line.startswith("-rw-r----- root/root"), line
    with tempfile.TemporaryDirectory() as control:
        _run(["dpkg-deb", "-e", deb, control])
        conffiles = Path(control, "conffiles").read_text().split()
        assert sorted(conffiles) == sorted(CONFFILES)
        postinst = Path(control, "postinst").read_text()
        prerm = Path(control, "prerm").read_text()
        postrm = Path(control, "postrm").read_text()
    for needle in ("adduser --quiet --system", "dpkg-statoverride --update --add root pgherd 0640",
                   "deb-systemd-helper enable 'pgherd.service'",
                   "deb-systemd-invoke $_dh_action 'pgherd.service'", "_dh_action=restart",
                   "compileall"):
        assert needle in postinst, needle
    assert "deb-systemd-invoke stop 'pgherd.service'" in prerm
    assert "__pycache__" in prerm
    assert "dpkg-statoverride --remove" in postrm and "deb-systemd-helper purge" in postrm
    assert "deluser" not in postrm, "the pgherd user is kept on purge"


# --------------------------------------------------------------------------------------
# the .rpm as a file
# --------------------------------------------------------------------------------------


def test_rpm_contents(packages, tmp_path):
    rpm = str(packages["rpm"])
    version = packages["version"]
    assert _run(["rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE}", rpm]).stdout == \
        f"pgherd {version} 1"
    files = set(_run(["rpm", "-qpl", rpm]).stdout.split())
    libdir = _run(["rpm", "--eval", "%{_libdir}"]).stdout.strip()
    venv = f"{libdir}/pgherd"
    for path in ("/usr/bin/pgherd", f"{venv}/bin/pgherd", f"{venv}/bin/python",
                 f"{venv}/pyvenv.cfg",
                 "/usr/lib/systemd/system/pgherd.service", "/usr/lib/sysusers.d/pgherd.conf",
                 "/etc/pgherd/pgherd.ini", "/etc/pgherd/userlist.txt", "/etc/logrotate.d/pgherd",
                 "/var/log/pgherd", "/usr/share/man/man1/pgherd.1.gz", *GRAFANA):
        assert path in files, f"{path} not in the .rpm"
    assert any(re.search(r"/site-packages/pgherd-[^/]+\.dist-info/", p) for p in files)
    assert set(_run(["rpm", "-qpc", rpm]).stdout.split()) == set(CONFFILES)
    modes = {}
    for line in _run(["rpm", "-qp", "--qf",
                      r"[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]",
                      rpm]).stdout.splitlines():
        perms, owner, path = line.split(" ", 2)
        modes[path] = (perms, owner)
    for path in ("/etc/pgherd/pgherd.ini", "/etc/pgherd/userlist.txt"):
        assert modes[path] == ("-rw-r-----", "root:pgherd"), (path, modes[path])
    flags = _run(["rpm", "-qp", "--qf", r"[%{FILEFLAGS:fflags} %{FILENAMES}\n]", rpm]).stdout
    for path in CONFFILES:
        assert re.search(rf"^cn {re.escape(path)}$", flags, re.M), f"{path}: not %config(noreplace)"

    scripts = _run(["rpm", "-qp", "--scripts", rpm]).stdout
    for needle in ("preinstall scriptlet", "groupadd -r pgherd", "useradd -r -g pgherd",
                   "postinstall scriptlet", "systemctl daemon-reload",
                   "systemctl --no-reload preset pgherd.service",
                   "preuninstall scriptlet", "systemctl --no-reload disable --now pgherd.service",
                   "postuninstall scriptlet", "systemctl try-restart pgherd.service"):
        assert needle in scripts, needle
    assert "%{" not in scripts and "%systemd" not in scripts, "unexpanded rpm macro"
    assert "userdel" not in scripts, "the pgherd user is kept on erase"
    requires = _run(["rpm", "-qp", "--requires", rpm]).stdout.split("\n")
    assert any(re.fullmatch(r"/usr/bin/python3\.\d+", r.strip()) for r in requires), requires
    assert "/usr/sbin/useradd" in requires and "logrotate" in requires

    # The payload is a working venv: run it with its own interpreter when this host has the
    # target Python (a Debian 12 builder has 3.11, the default).
    root = tmp_path / "root"
    root.mkdir()
    with open(rpm, "rb") as src:
        archive = subprocess.run(["rpm2archive", "-"], stdin=src, capture_output=True,
                                 timeout=120, check=True).stdout
    subprocess.run(["tar", "-xzf", "-", "-C", str(root)], input=archive, check=True)
    venv_bin = root / venv.lstrip("/") / "bin"
    (interpreter,) = [p for p in files if re.fullmatch(rf"{venv}/bin/python3\.\d+", p)]
    # The venv's interpreter links to the system's (/usr/bin/python3.X): provide it in the
    # unpacked tree from this host, as the target system would.
    link = venv_bin / Path(interpreter).name
    system_python = Path(os.path.normpath(venv_bin / os.readlink(link)))
    assert system_python == root / "usr" / "bin" / Path(interpreter).name
    host_python = Path("/usr/bin", system_python.name)
    if not host_python.exists():
        pytest.skip(f"the rpm targets {system_python.name}, which this host lacks")
    system_python.parent.mkdir(parents=True, exist_ok=True)
    system_python.symlink_to(host_python)
    out = _run([str(venv_bin / "python"), "-I", "-c",
                "import sys, gevent, msgspec, psutil; from prefork.cli import main; "
                "print(sys.prefix); sys.argv = ['pgherd', '--version']; main()"]).stdout
    assert out.splitlines() == [str(root / venv.lstrip("/")), f"pgherd, version {version}"]


# --------------------------------------------------------------------------------------
# the .deb installed, run as its unit says, removed and purged
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _policy_rc_d_forbids_starting() -> Iterator[None]:
    """Like a container: services must not start during the install (deb-systemd-invoke and
    invoke-rc.d ask /usr/sbin/policy-rc.d)."""
    path = Path("/usr/sbin/policy-rc.d")
    backup = None
    if path.exists() or path.is_symlink():
        backup = path.with_name("policy-rc.d.pgherd-test")
        path.rename(backup)
    path.write_text("#!/bin/sh\nexit 101\n")
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink()
        if backup is not None:
            backup.rename(path)


class NotifySocket:
    """A stand-in for systemd's notify socket: collects the datagrams."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)  # the service runs as pgherd
        self.lines: list[str] = []

    def _drain(self, timeout: float) -> None:
        while select.select([self.sock], [], [], timeout)[0]:
            self.lines.extend(self.sock.recv(65536).decode().splitlines())
            timeout = 0

    def wait(self, line: str, since: int, proc: subprocess.Popen, timeout: float = 30) -> int:
        """Index after the first ``line`` at or after ``since``; fails if pgherd exits."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(since, len(self.lines)):
                if self.lines[i] == line:
                    return i + 1
            if proc.poll() is not None:
                raise AssertionError(f"pgherd exited ({proc.returncode}) before {line}; "
                                     f"notifications: {self.lines}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line} within {timeout}s; got {self.lines}")
            self._drain(0.2)

    def close(self) -> None:
        self.sock.close()


def _as_unit_user(unit: dict[str, str], argv: list[str]) -> list[str]:
    """argv run with the unit's User=/Group= and NoNewPrivileges= (setpriv execs, so the pid
    stays the service's: it is $MAINPID)."""
    prefix = ["setpriv", "--reuid", unit["Service.User"], "--regid", unit["Service.Group"],
              "--init-groups"]
    if unit.get("Service.NoNewPrivileges") == "yes":
        prefix.append("--no-new-privs")
    return prefix + ["--", *argv]


def test_deb_install_run_reload_remove_purge(packages, pg, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("installs the .deb with apt-get and runs pgherd as the pgherd user: "
                    "needs root (CI runs as root on a disposable machine)")
    _need_debs(CHECK_TOOLS)
    version = packages["version"]
    with _packaging_lock():
        if _deb_state():
            _run(["apt-get", "purge", "-y", "-q", "pgherd"])
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        proc = None
        workdir = Path(tempfile.mkdtemp(prefix="pgherd-pkgtest-", dir="/tmp"))
        workdir.chmod(0o711)
        notify = NotifySocket(workdir)
        try:
            with _policy_rc_d_forbids_starting():
                _run(["apt-get", "install", "-y", "-q", str(packages["deb"])], env=env)
            assert _deb_state() == "ii"
            proc = _installed_checks_and_run(version, pg, workdir, notify)
            _run(["apt-get", "remove", "-y", "-q", "pgherd"], env=env)
            assert _deb_state() == "rc", "removed, configuration files kept"
            for path in CONFFILES:
                assert Path(path).exists(), f"{path} removed by apt-get remove"
            assert "pkgtest = host=127.0.0.1" in Path("/etc/pgherd/pgherd.ini").read_text()
            assert not Path("/usr/bin/pgherd").exists() and not Path("/usr/lib/pgherd").exists()
            assert pwd.getpwnam("pgherd")
            _run(["apt-get", "purge", "-y", "-q", "pgherd"], env=env)
            assert _deb_state() == ""
            for path in (*CONFFILES, "/etc/pgherd", "/var/log/pgherd"):
                assert not Path(path).exists(), f"{path} left after purge"
            assert "/etc/pgherd" not in _run(["dpkg-statoverride", "--list"]).stdout
            assert pwd.getpwnam("pgherd") and grp.getgrnam("pgherd"), "user kept on purge"
        finally:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            notify.close()
            if _deb_state():
                _run(["apt-get", "purge", "-y", "-q", "pgherd"], env=env, check=False)
            shutil.rmtree("/run/pgherd", ignore_errors=True)
            shutil.rmtree(workdir, ignore_errors=True)


def _installed_checks_and_run(version: str, pg, workdir: Path,
                              notify: NotifySocket) -> subprocess.Popen:
    user = pwd.getpwnam("pgherd")
    group = grp.getgrnam("pgherd")
    assert user.pw_gid == group.gr_gid and user.pw_shell == "/usr/sbin/nologin"
    assert os.path.realpath("/usr/bin/pgherd") == "/usr/lib/pgherd/bin/pgherd"
    out = _run(["/usr/bin/pgherd", "--version"]).stdout.strip()
    assert out == f"pgherd, version {version}"
    for path in ("/etc/pgherd/pgherd.ini", "/etc/pgherd/userlist.txt"):
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, group.gr_gid), path
    conffiles = _run(["dpkg-query", "-W", "-f=${Conffiles}", "pgherd"]).stdout
    assert sorted(re.findall(r"^ (\S+) ", conffiles, re.M)) == sorted(CONFFILES)
    assert list(Path("/usr/lib/pgherd/lib").rglob("__pycache__/*.pyc")), "postinst compiles"
    unit_path = Path("/lib/systemd/system/pgherd.service")
    assert unit_path.read_text() == UNIT_SOURCE.read_text()
    verify = _run(["systemd-analyze", "verify", str(unit_path)], check=False)
    assert verify.returncode == 0 and "pgherd.service" not in verify.stderr, verify.stderr
    # Anyone but root and the pgherd group is kept out of the userlist.
    denied = _run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                   "cat", "/etc/pgherd/userlist.txt"], check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    unit = _parse_unit(unit_path.read_text())
    # The packaged configuration, as shipped, is valid and readable by the service user.
    _run(_as_unit_user(unit, ["/usr/bin/pgherd", "check", "/etc/pgherd/pgherd.ini"]))

    # What an administrator does: point it at PostgreSQL, add a user (the files keep their
    # owner and mode); this port, as 6432 may be taken.
    port = free_port()
    ini = Path("/etc/pgherd/pgherd.ini")
    text = ini.read_text()
    assert "\nlisten_port = 6432\n" in text and "\n[databases]\n" in text
    text = text.replace("\nlisten_port = 6432\n", f"\nlisten_port = {port}\n").replace(
        "\n[databases]\n", f"\n[databases]\npkgtest = host=127.0.0.1 port={pg.port} dbname=p0\n")
    ini.write_text(text)
    with open("/etc/pgherd/userlist.txt", "a") as f:
        f.write('"app" "apppw"\n')

    # What systemd does before ExecStart: the unit's directories, owned by User=/Group=.
    for key, base in (("RuntimeDirectory", "/run"), ("LogsDirectory", "/var/log")):
        d = Path(base, unit[f"Service.{key}"])
        d.mkdir(mode=int(unit.get(f"Service.{key}Mode", "0755"), 8), exist_ok=True)
        os.chown(d, user.pw_uid, group.gr_gid)
    nofile = int(unit["Service.LimitNOFILE"])
    umask = int(unit.get("Service.UMask", "0022"), 8)
    # LimitNOFILE=: some sandboxes (this one) refuse even root a higher hard limit; then the
    # service gets the highest it may have.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def service_context() -> None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        except ValueError:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.umask(umask)

    service_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "LANG": "C.UTF-8", "HOME": user.pw_dir, "USER": "pgherd",
                   "LOGNAME": "pgherd", "SHELL": user.pw_shell, "NOTIFY_SOCKET": notify.path,
                   "WATCHDOG_USEC": str(int(float(unit["Service.WatchdogSec"]) * 1e6))}
    output = open(workdir / "output", "wb")
    proc = subprocess.Popen(_as_unit_user(unit, _exec_argv(unit["Service.ExecStart"])),
                            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                            env=service_env, preexec_fn=service_context, start_new_session=True)
    output.close()

    def log_text() -> str:
        return (workdir / "output").read_text(errors="replace")

    try:
        seen = notify.wait("READY=1", 0, proc)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- pgherd output\n{log_text()}") from None
    assert f"MAINPID={proc.pid}" in notify.lines
    notify.wait("WATCHDOG=1", 0, proc, timeout=float(unit["Service.WatchdogSec"]))
    assert Path("/run/pgherd/pgherd.pid").read_text().strip() == str(proc.pid)
    master = psutil.Process(proc.pid)
    assert master.username() == "pgherd"
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    soft_now = int(re.search(r"^Max open files\s+(\d+)", limits, re.M).group(1))
    assert soft_now in (nofile, hard), limits
    workers = master.children()
    assert workers and all(w.username() == "pgherd" for w in workers)

    def query(dbname: str, host: str = "127.0.0.1") -> tuple:
        with psycopg.connect(host=host, port=port, dbname=dbname, user="app", password="apppw",
                             connect_timeout=10) as conn:
            return conn.execute("SELECT current_user, current_database()").fetchone()

    assert query("pkgtest") == ("app", "p0")
    assert query("pkgtest", host="/run/pgherd") == ("app", "p0")  # the Unix socket
    logfile = Path("/var/log/pgherd/pgherd.log")
    assert logfile.stat().st_uid == user.pw_uid and "pgherd master started" in logfile.read_text()

    # ExecReload, run as systemd does ($MAINPID, User=): an edited config goes live.
    ini.write_text(ini.read_text().replace(
        "\n[databases]\n", f"\n[databases]\npkgtest2 = host=127.0.0.1 port={pg.port} dbname=p1\n"))
    _run(_as_unit_user(unit, _exec_argv(unit["Service.ExecReload"], mainpid=proc.pid)))
    seen = notify.wait("RELOADING=1", seen, proc)
    seen = notify.wait("READY=1", seen, proc)
    assert query("pkgtest2") == ("app", "p1")

    # logrotate: the log is renamed, the postrotate reload makes pgherd reopen it.
    old_inode = logfile.stat().st_ino
    _run(["logrotate", "--force", "--state", str(workdir / "logrotate.state"),
          "/etc/logrotate.d/pgherd"])
    assert Path("/var/log/pgherd/pgherd.log.1").exists()
    seen = notify.wait("RELOADING=1", seen, proc)
    seen = notify.wait("READY=1", seen, proc)
    wait_for(lambda: logfile.exists() and logfile.stat().st_ino != old_inode
             and "RELOAD" in logfile.read_text(), timeout=10,
             message="pgherd writing to the new log file")
    assert logfile.stat().st_uid == user.pw_uid

    # systemctl stop: KillSignal= to the main process only (KillMode=mixed).
    assert unit["Service.KillMode"] == "mixed"
    os.kill(proc.pid, signal.Signals[unit["Service.KillSignal"]])
    notify.wait("STOPPING=1", seen, proc)
    assert proc.wait(float(unit["Service.TimeoutStopSec"])) == 0, log_text()
    assert not Path("/run/pgherd/pgherd.pid").exists()
    assert not Path(f"/run/pgherd/.s.PGSQL.{port}").exists()
    wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                             for w in workers), timeout=10, message="workers gone")
    return proc
