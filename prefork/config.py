"""Reading pgherd's configuration into immutable, typed structs.

This module owns the file formats (pgbouncer.ini with ``%include``, and the auth_file) and the
``Config`` the master hands to its workers; the keys themselves are declared in
``prefork.settings``. ``load_config`` is pure (it reads files and nothing else): the master calls
it at start and on every reload, and either gets a whole valid ``Config`` or a ``ConfigError``
listing every error found, so a bad reload changes nothing. What to do with settings that need a
restart (``Setting.reload``) is the master's business, not this module's.

Choices, PgBouncer's unless said otherwise:

* Sections: ``[pgbouncer]`` (also spelled ``[pgherd]``), ``[databases]``, ``[users]``; ``[peers]``
  is recognised and ignored with a warning. Section and key names are case-sensitive. At least
  one main section must exist.
* pgherd's own settings where PgBouncer never looks: PgBouncer refuses a file with a section
  or a key it does not know ("invalid section", "unknown parameter"), so a file that must stay
  readable by PgBouncer (to roll back) keeps pgherd's keys in a companion file beside it,
  ``<name>.pgherd.ini`` for ``<name>.ini`` (:func:`companion_path`), with one ``[pgherd]``
  section, read after the main file (its values win) on every load and reload. pgherd's keys are
  still accepted in ``[pgbouncer]`` for existing users.
* Lines: ``;`` or ``#`` start a comment only at the start of a line; ``key = value`` takes the
  rest of the line verbatim (trailing blanks dropped). Keys are ``[A-Za-z0-9_.*-]+``, or quoted:
  ``"SQL style"`` (``""`` is a quote) or ``'single'``, for database and user names.
* A key given twice: the later one wins, silently. Every bad occurrence is still an error.
* ``%include path``: an absolute path is read as is. A relative one is tried against the
  current working directory (what PgBouncer does) and, when nothing is there, against the
  directory of the including file (pgherd's addition, so a config tree works wherever the
  service is started). At most 10 nested levels; cycles, missing files and too deep nesting are
  errors naming the including file and line. The current section carries into and out of an
  included file, as in PgBouncer.
* Errors (the config is rejected): syntax errors, unknown sections and keys, bad or out-of-range
  values, unreadable files, reserved database names, an ``auth_type`` pgherd does not
  implement. Warnings (the config loads, ``Config.warnings``): keys pgherd recognises but does
  not implement yet ("not supported yet, ignored").
* Connection strings in ``[databases]``/``[users]``: ``key=value`` pairs separated by blanks; a
  value may be single-quoted, inside which ``\\'`` and ``''`` are a quote and ``\\\\`` a backslash
  (libpq's and PgBouncer's escapes; any other backslash is kept). Empty values are errors. An
  integer or time override of ``-1`` means "not set" (PgBouncer's documented sentinel).
* auth_file: read when ``auth_type`` needs it (trust, plain, md5, scram-sha-256; ``any`` does
  not, as in PgBouncer), relative to the working directory like PgBouncer. Unreadable or
  malformed is an error; not set at all is a warning (nobody could log in).
* Resolved values: ``workers = 0`` becomes ``os.cpu_count()``; an unset ``conffile`` becomes
  the path that was loaded (what PgBouncer's SHOW CONFIG reports, and what the next reload reads).
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Literal, NamedTuple

import msgspec

from prefork.settings import DATABASE_ALIASES, DATABASE_PARAMS, SETTINGS, USER_PARAMS, Setting

MAIN_SECTIONS = ("pgbouncer", "pgherd")
RESERVED_DATABASES = ("pgbouncer", "pgherd")
MAX_INCLUDE_DEPTH = 10
COMMAND_LINE = "<command line>"
AUTH_TYPES_WITH_FILE = ("trust", "plain", "md5", "scram-sha-256")

Settings = msgspec.defstruct(
    "Settings",
    [(s.name, s.python_type, s.default) for s in SETTINGS.values()],
    frozen=True,
    module=__name__,
)
Settings.__doc__ = "Every [pgbouncer] setting, typed; fields and defaults come from SETTINGS."


class Problem(msgspec.Struct, frozen=True):
    """One error or warning, located in a file (line 0 = the file as a whole)."""

    file: str
    line: int
    key: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


class Database(msgspec.Struct, frozen=True):
    """A ``[databases]`` entry. ``None`` overrides mean "use the global setting"."""

    name: str
    host: tuple[str, ...] = ()  # () = Unix socket in unix_socket_dir; "/dir" = socket dir
    port: int = 5432
    dbname: str | None = None  # None = the database name the client asked for
    user: str | None = None
    password: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_db_connections: int | None = None
    pool_mode: str | None = None
    connect_query: str | None = None
    client_encoding: str | None = None
    datestyle: str | None = None
    timezone: str | None = None
    application_name: str | None = None
    query_wait_timeout: float | None = None
    server_lifetime: float | None = None
    auth_user: str | None = None
    auth_query: str | None = None
    auth_dbname: str | None = None
    max_db_client_connections: int | None = None
    load_balance_hosts: str | None = None


class User(msgspec.Struct, frozen=True):
    """A ``[users]`` entry. ``None`` overrides mean "use the database or global setting"."""

    name: str
    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int | None = None
    query_timeout: float | None = None
    query_wait_timeout: float | None = None
    idle_transaction_timeout: float | None = None
    client_idle_timeout: float | None = None
    max_user_client_connections: int | None = None
    transaction_timeout: float | None = None


class Config(msgspec.Struct, frozen=True):
    """A whole valid configuration, as loaded at one moment."""

    path: str
    settings: Settings  # type: ignore[valid-type]
    databases: dict[str, Database]
    users: dict[str, User]
    userlist: dict[str, str]  # user -> secret (plain, md5..., or SCRAM-SHA-256$...)
    warnings: tuple[Problem, ...] = ()

    def database(self, name: str) -> Database | None:
        """The entry for ``name``, else the ``*`` fallback, else None."""
        db = self.databases.get(name)
        return db if db is not None else self.databases.get("*")

    def with_setting(self, name: str, value: Any) -> Config:
        """This configuration with one setting changed (the console's SET), resolved as
        the same value read from the file would be."""
        values = msgspec.structs.asdict(self.settings)
        values[name] = value
        _resolve(values, self.path)
        return msgspec.structs.replace(self, settings=Settings(**values))


def _resolve(values: dict[str, Any], path: str) -> None:
    """Values that stand for another one: ``workers = 0`` is one per CPU, an empty
    ``conffile`` the file that was loaded."""
    if values["workers"] == 0:
        values["workers"] = os.cpu_count() or 1
    if not values["conffile"]:
        values["conffile"] = path


def load_config(path: str, overrides: dict[str, str] | None = None) -> Config:
    """Read ``path`` (and its includes and auth_file) into a Config, or raise ConfigError.

    ``overrides`` are ``[pgbouncer]`` settings from the command line, applied after the files
    and validated the same way (reported as ``<command line>``).
    """
    loader = _Loader()
    reader = _IniReader(loader)
    reader.read_main(path)
    companion = companion_path(path)
    if os.path.exists(companion):
        reader.read_companion(companion)
    for key, raw in (overrides or {}).items():
        loader.set_setting(COMMAND_LINE, 0, key, raw)
    if reader.files_read and not reader.main_seen:
        loader.error(path, 0, "", "no [pgbouncer] section")

    values = loader.values
    _resolve(values, path)
    settings = Settings(**values)
    userlist = loader.read_auth_file(path, settings)

    errors = [p for p in loader.problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return Config(
        path=path,
        settings=settings,
        databases=loader.databases,
        users=loader.users,
        userlist=userlist,
        warnings=tuple(loader.problems),
    )


def companion_path(path: str) -> str:
    """Where pgherd's own settings for the config file ``path`` live, out of PgBouncer's sight:
    ``pgbouncer.ini`` -> ``pgbouncer.pgherd.ini``."""
    stem, ext = os.path.splitext(path)
    return (stem if ext == ".ini" else path) + ".pgherd.ini"


def load_userlist(path: str) -> dict[str, str]:
    """Read a PgBouncer auth_file: ``"user" "secret"`` per line, ``""`` inside a field is a quote.

    Blank lines and lines starting with ``;`` or ``#`` are skipped; anything after the secret is
    ignored (as PgBouncer does). Raises ConfigError naming every malformed line.
    """
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(path, 0, "", f"cannot read: {_reason(exc)}")]) from None
    users, problems = _parse_userlist(path, text)
    if problems:
        raise ConfigError(problems)
    return users


# --- the INI reader --------------------------------------------------------------------------


class _Entry(NamedTuple):
    file: str
    line: int
    section: str
    key: str
    value: str


_SECTION_RE = re.compile(r"\[([^\]]*)\]\s*(?:[;#].*)?")
_INCLUDE_RE = re.compile(r"%include\s+(.+)")
_KEY_RE = re.compile(r"""(?:"((?:[^"]|"")+)"|'([^']+)'|([A-Za-z0-9_.*-]+))[ \t]*=[ \t]*(.*)""")
_SKIPPED = "?"  # [peers] or an unknown section: reported once at its header, its lines ignored


class _IniReader:
    """Feeds the lines of a file, and of its includes in place, to a ``_Loader`` in order."""

    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.section: str | None = None
        self.main_seen = False
        self.files_read = 0
        self.companion = False  # reading the companion file: only [pgherd] belongs there

    def read_main(self, path: str) -> None:
        try:
            text = _read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            self.loader.error(path, 0, "", f"cannot read config file: {_reason(exc)}")
            return
        self._parse(path, text, (os.path.realpath(path),))

    def read_companion(self, path: str) -> None:
        """pgherd's own settings file (see :func:`companion_path`), after the main file."""
        self.section, self.companion = None, True
        try:
            self.read_main(path)
        finally:
            self.companion = False

    def _include(self, file: str, line: int, name: str, chain: tuple[str, ...]) -> None:
        if len(chain) > MAX_INCLUDE_DEPTH:
            too_deep = f"include nesting too deep (more than {MAX_INCLUDE_DEPTH} levels)"
            self.loader.error(file, line, "%include", too_deep)
            return
        target = _resolve_include(name, file)
        real = os.path.realpath(target)
        if real in chain:
            cycle = " -> ".join(chain[chain.index(real):] + (real,))
            self.loader.error(file, line, "%include", f"include cycle: {cycle}")
            return
        try:
            text = _read_text(target)
        except (OSError, UnicodeDecodeError) as exc:
            self.loader.error(file, line, "%include", f"cannot read include file {target!r}: {_reason(exc)}")
            return
        self._parse(target, text, chain + (real,))

    def _parse(self, file: str, text: str, chain: tuple[str, ...]) -> None:
        self.files_read += 1
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw.strip()
            if not line or line[0] in ";#":
                continue
            if line.startswith("%"):
                m = _INCLUDE_RE.fullmatch(line)
                if m:
                    self._include(file, lineno, m.group(1).strip(), chain)
                else:
                    self.loader.error(file, lineno, "", f"syntax error: {line!r} (expected %include path)")
                continue
            if line.startswith("["):
                self._section(file, lineno, line)
                continue
            m = _KEY_RE.fullmatch(line)
            if not m:
                self.loader.error(file, lineno, "", f"syntax error: {line!r} (expected key = value)")
                continue
            dquoted, squoted, bare, value = m.groups()
            key = dquoted.replace('""', '"') if dquoted is not None else squoted or bare
            if self.section is None:
                self.loader.error(file, lineno, key, "setting outside of any [section]")
            elif self.section != _SKIPPED:
                self.loader.apply(_Entry(file, lineno, self.section, key, value))

    def _section(self, file: str, lineno: int, line: str) -> None:
        m = _SECTION_RE.fullmatch(line)
        if not m:
            self.loader.error(file, lineno, "", f"syntax error: {line!r} (expected [section])")
            self.section = _SKIPPED
            return
        name = m.group(1).strip()
        if self.companion and name != "pgherd":
            self.loader.error(file, lineno, f"[{name}]",
                              "only a [pgherd] section belongs in pgherd's settings file")
            self.section = _SKIPPED
        elif name in MAIN_SECTIONS:
            self.section = "pgbouncer"
            self.main_seen = True
        elif name in ("databases", "users"):
            self.section = name
        elif name == "peers":
            self.loader.warn(file, lineno, "[peers]", "not supported yet, ignored")
            self.section = _SKIPPED
        else:
            self.loader.error(
                file, lineno, f"[{name}]",
                "unknown section (expected [pgbouncer], [databases], [users] or [peers])",
            )
            self.section = _SKIPPED


def _resolve_include(name: str, including_file: str) -> str:
    if os.path.isabs(name) or os.path.exists(name):
        return name
    return os.path.join(os.path.dirname(including_file), name)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.start})"
    return exc.strerror or str(exc)


# --- turning entries into values -------------------------------------------------------------


class _Loader:
    """Collects typed values and every problem while entries are applied in order."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.values: dict[str, Any] = {name: s.default for name, s in SETTINGS.items()}
        self.where: dict[str, tuple[str, int]] = {}
        self.databases: dict[str, Database] = {}
        self.users: dict[str, User] = {}

    def error(self, file: str, line: int, key: str, message: str) -> None:
        self.problems.append(Problem(file, line, key, message, "error"))

    def warn(self, file: str, line: int, key: str, message: str) -> None:
        self.problems.append(Problem(file, line, key, message, "warning"))

    def apply(self, entry: _Entry) -> None:
        if entry.section == "pgbouncer":
            self.set_setting(entry.file, entry.line, entry.key, entry.value)
        elif entry.section == "databases":
            self.add_database(entry)
        else:
            self.add_user(entry)

    def set_setting(self, file: str, line: int, key: str, raw: str) -> None:
        setting = SETTINGS.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, SETTINGS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.error(file, line, key, f"unknown setting{hint}")
            return
        try:
            value = setting.parse(raw)
        except ValueError as exc:
            self.error(file, line, key, str(exc))
            return
        if not setting.supported:
            self.warn(file, line, key, "not supported yet, ignored")
        self.values[key] = value
        self.where[key] = (file, line)

    def add_database(self, entry: _Entry) -> None:
        if entry.key in RESERVED_DATABASES:
            self.error(entry.file, entry.line, entry.key, "database name is reserved for the admin console")
            return
        fields = self._params(entry, DATABASE_PARAMS, DATABASE_ALIASES, "connection parameter")
        if fields is not None:
            self.databases[entry.key] = Database(name=entry.key, **fields)

    def add_user(self, entry: _Entry) -> None:
        fields = self._params(entry, USER_PARAMS, {}, "user parameter")
        if fields is not None:
            self.users[entry.key] = User(name=entry.key, **fields)

    def _params(
        self, entry: _Entry, params: dict[str, Setting], aliases: dict[str, str], what: str
    ) -> dict[str, Any] | None:
        """The typed fields of one connection string, or None when it has errors (all reported)."""
        try:
            pairs = _split_connstr(entry.value)
        except ValueError as exc:
            self.error(entry.file, entry.line, entry.key, f"syntax error in connection string: {exc}")
            return None
        fields: dict[str, Any] = {}
        ok = True
        for written, raw in pairs:
            name = aliases.get(written, written)
            param = params.get(name)
            try:
                if param is None:
                    raise ValueError(f"unrecognized {what}")
                fields[name] = _param_value(param, raw)
            except ValueError as exc:
                self.error(entry.file, entry.line, entry.key, f"{written}: {exc}")
                ok = False
                continue
            if not param.supported:
                self.warn(entry.file, entry.line, entry.key, f"{written}: not supported yet, ignored")
        return fields if ok else None

    def read_auth_file(self, path: str, settings: Any) -> dict[str, str]:
        if settings.auth_type not in AUTH_TYPES_WITH_FILE:
            return {}
        file, line = self.where.get("auth_file", (path, 0))
        if not settings.auth_file:
            nobody = f"not set, so no user can log in with auth_type {settings.auth_type}"
            self.warn(file, line, "auth_file", nobody)
            return {}
        try:
            text = _read_text(settings.auth_file)
        except (OSError, UnicodeDecodeError) as exc:
            self.error(file, line, "auth_file", f"cannot read {settings.auth_file!r}: {_reason(exc)}")
            return {}
        users, problems = _parse_userlist(settings.auth_file, text)
        self.problems += problems
        return users


def _param_value(param: Setting, raw: str) -> Any:
    if param.name == "host":
        hosts = tuple(h.strip() for h in raw.split(","))
        if not all(hosts):
            raise ValueError(f"empty host name in {raw!r}")
        return hosts
    # -1 is PgBouncer's "not set" for numeric overrides; a port has no such state.
    if raw == "-1" and param.kind in ("int", "time") and param.name != "port":
        return None
    return param.parse(raw)


def _split_connstr(text: str) -> list[tuple[str, str]]:
    """``key=value`` pairs of a libpq-style connection string, in order."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return pairs
        start = i
        while i < n and text[i] != "=" and not text[i].isspace():
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if not key or i == n or text[i] != "=":
            raise ValueError(f"expected key=value at {text[start:]!r}")
        i += 1
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == "'":
            value, i = _unquote(text, i + 1, key)
        else:
            start = i
            while i < n and not text[i].isspace():
                i += 1
            value = text[start:i]
        if not value:
            raise ValueError(f"empty value for {key}")
        pairs.append((key, value))


def _unquote(text: str, i: int, key: str) -> tuple[str, int]:
    """The single-quoted value starting after the opening quote at ``i``, and where it ends."""
    out: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "'\\":
            out.append(text[i + 1])
            i += 2
        elif c == "'" and i + 1 < n and text[i + 1] == "'":
            out.append("'")
            i += 2
        elif c == "'":
            if i + 1 < n and not text[i + 1].isspace():
                raise ValueError(f"unexpected {text[i + 1]!r} after the quoted value of {key}")
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise ValueError(f"unterminated quoted value for {key}")


def _parse_userlist(path: str, text: str) -> tuple[dict[str, str], list[Problem]]:
    users: dict[str, str] = {}
    problems: list[Problem] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        try:
            user, rest = _quoted_field(line)
            rest = rest.lstrip()
            if not rest:
                raise ValueError('no secret (expected "user" "secret")')
            secret, _ = _quoted_field(rest)
            if not user:
                raise ValueError("empty user name")
        except ValueError as exc:
            problems.append(Problem(path, lineno, "", f"malformed line: {exc}"))
            continue
        users[user] = secret
    return users, problems


def _quoted_field(s: str) -> tuple[str, str]:
    """A leading ``"..."`` field (``""`` = a quote) and the text after it."""
    if not s.startswith('"'):
        raise ValueError(f'expected a "double-quoted" field at {s[:20]!r}')
    out: list[str] = []
    i, n = 1, len(s)
    while i < n:
        if s[i] == '"':
            if i + 1 < n and s[i + 1] == '"':
                out.append('"')
                i += 2
                continue
            return "".join(out), s[i + 1:]
        out.append(s[i])
        i += 1
    raise ValueError("unterminated quoted field")
