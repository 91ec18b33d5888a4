"""Password authentication mechanics, sans-IO: secrets, md5, cleartext and SCRAM-SHA-256.

This module owns the cryptography and the SCRAM message grammar of both directions:

* clients -> pgherd: :func:`md5_verify`, :func:`plain_verify` and :class:`ScramServer`
  (including PostgreSQL-style mock authentication for unknown users);
* pgherd -> PostgreSQL: :func:`md5_client_response` and :class:`ScramClient`, which logs in
  either with a plaintext password or, for SCRAM passthrough (PgBouncer 1.14, reference §4.7),
  with the ClientKey/ServerKey that :class:`ScramServer` recovered from a client's login.

It owns no socket and no protocol framing: the caller parses AuthenticationSASL /
SASLInitialResponse / PasswordMessage and friends and hands over the SCRAM or password payload
bytes. Every malformed or wrong input ends in :class:`AuthFailed`, whose text is meant for the
log; the caller sends PgBouncer's client-facing texts ("password authentication failed",
"SASL authentication failed", "server login failed: ...").

Stored secrets are what ``auth_file`` / ``auth_query`` yield (reference §1.5): a plaintext
password, ``md5`` + md5(password + user), or ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``.
As in PgBouncer's ``get_password_type``, a value that parses as a SCRAM secret or looks like an
md5 secret is one, anything else is plaintext; an empty secret never authenticates anybody.

Why the SCRAM state machines are written here and not taken from scramp: scramp rejects the
empty user name (``n=``) that libpq and PgBouncer send and PostgreSQL expects, cannot run a mock
exchange, does not reveal the ClientKey needed for passthrough nor accept one in its client, and
raises on passwords that SASLprep prohibits where PostgreSQL falls back to the raw bytes. From
scramp we take ``saslprep`` (RFC 4013); the tests use scramp's client as an independent peer.

Strings that came from raw bytes (user names, passwords) are encoded back as UTF-8 with
``surrogateescape``, so a caller that decoded non-UTF-8 bytes that way gets PostgreSQL's
byte-exact md5 and SCRAM results.

Salts that must not reveal anything -- the mock salt of an unknown user and the salt of the
ad-hoc secret built from a plaintext password -- are HMAC(process key, user name). Both are
stable per user name, like the salt of a real secret, so probing cannot tell the three cases
apart (PgBouncer likewise caches the ad-hoc secret per user). The key is drawn when this module
is imported: import it in the master before forking so that every worker shares it, otherwise
a salt would change with the worker a connection lands on.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets

import msgspec
from scramp.utils import ScramException, saslprep

__all__ = [
    "SCRAM_SHA_256",
    "AuthFailed",
    "ScramClient",
    "ScramSecret",
    "ScramServer",
    "is_md5_secret",
    "md5_client_response",
    "md5_secret",
    "md5_verify",
    "parse_scram_secret",
    "plain_verify",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"

_KEY_LEN = 32  # SHA-256 digest size: StoredKey, ServerKey, ClientKey, proofs, signatures
_SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_RAW_NONCE_LEN = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
_MAX_ITERATIONS = 2**31 - 1  # PostgreSQL keeps the count in an int

_MD5_SECRET = re.compile(r"md5[0-9a-f]{32}")
_SCRAM_SECRET = re.compile(r"SCRAM-SHA-256\$([0-9]{1,10}):([^$:]+)\$([^$:]+):([^$:]+)")
_SERVER_FIRST = re.compile(r"r=([^,]+),s=([^,]+),i=([0-9]{1,10})")
_EXTENSION = re.compile(r"[A-Za-z]=[^,]*")

# Base64 of the gs2 header the client sent, which it must repeat in c= of its final message.
_CBIND_INPUT = {"n": "biws", "y": "eSws"}

_PROCESS_KEY = secrets.token_bytes(32)


class AuthFailed(Exception):
    """Authentication failed or the peer broke the exchange; the text is for the log."""


class ScramSecret(msgspec.Struct, frozen=True):
    """A parsed ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` secret."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


def parse_scram_secret(secret: str) -> ScramSecret | None:
    """Parse a SCRAM-SHA-256 secret as PostgreSQL stores it, or return None if it is not one."""
    match = _SCRAM_SECRET.fullmatch(secret)
    if match is None:
        return None
    iterations = int(match[1])
    salt, stored_key, server_key = (_b64decode(match[i]) for i in (2, 3, 4))
    if not 0 < iterations <= _MAX_ITERATIONS or not salt:
        return None
    if stored_key is None or len(stored_key) != _KEY_LEN:
        return None
    if server_key is None or len(server_key) != _KEY_LEN:
        return None
    return ScramSecret(iterations, salt, stored_key, server_key)


def is_md5_secret(secret: str) -> bool:
    """True for ``md5`` followed by 32 lowercase hex digits, PostgreSQL's md5 secret format."""
    return _MD5_SECRET.fullmatch(secret) is not None


def md5_secret(user: str, password: str | bytes) -> str:
    """The md5 secret PostgreSQL stores for ``user``: ``md5`` + md5hex(password + user)."""
    return "md5" + hashlib.md5(_bytes(password) + _bytes(user)).hexdigest()


def md5_verify(stored: str, user: str, salt: bytes, response: bytes) -> bool:
    """Check a client's md5 PasswordMessage payload (without its NUL) against a stored secret.

    ``stored`` is a plaintext password or an md5 secret; a SCRAM secret cannot answer an md5
    challenge (the caller runs SCRAM instead), so it never matches here.
    """
    if not stored or not response or parse_scram_secret(stored) is not None:
        return False
    inner = stored[3:] if is_md5_secret(stored) else md5_secret(user, stored)[3:]
    return hmac.compare_digest(_md5_salted(inner, salt), bytes(response))


def plain_verify(stored: str, user: str, password: str | bytes) -> bool:
    """Check a cleartext password against a plaintext, md5 or SCRAM stored secret."""
    if not stored or not password:
        return False
    secret = parse_scram_secret(stored)
    if secret is not None:
        _, stored_key, server_key = _scram_keys(password, secret.salt, secret.iterations)
        return hmac.compare_digest(stored_key + server_key, secret.stored_key + secret.server_key)
    if is_md5_secret(stored):
        expected = md5_secret(user, password).encode("ascii")
        return hmac.compare_digest(expected, stored.encode("ascii"))
    return hmac.compare_digest(_bytes(stored), _bytes(password))


def md5_client_response(user: str, stored: str, salt: bytes) -> bytes:
    """The PasswordMessage payload (without its NUL) answering a server's md5 challenge.

    Works from a plaintext password or directly from an md5 secret, whose hex part is the inner
    hash md5 authentication is built on.
    """
    if is_md5_secret(stored):
        inner = stored[3:]
    elif parse_scram_secret(stored) is not None:
        raise AuthFailed("cannot do MD5 authentication: wrong password type")
    else:
        inner = md5_secret(user, stored)[3:]
    return _md5_salted(inner, salt)


class ScramServer:
    """pgherd's side of a client's SCRAM-SHA-256 login (RFC 5802/7677, no channel binding).

    ``stored`` is the user's secret: a SCRAM secret, a plaintext password (an ad-hoc secret is
    derived from it), or None -- unknown user, or an md5 secret that cannot do SCRAM. Then the
    exchange is a mock that looks like a real one and always fails at the final step.

    After a successful exchange against a real SCRAM secret, ``client_key`` and ``server_key``
    hold what SCRAM passthrough needs to log in to PostgreSQL on the client's behalf.
    """

    def __init__(self, user: str, stored: str | None, iterations: int = 4096) -> None:
        self.client_key: bytes | None = None
        self.server_key: bytes | None = None
        secret = parse_scram_secret(stored) if stored else None
        self._passthrough = secret is not None
        if secret is None and stored and not is_md5_secret(stored):
            secret = _adhoc_secret(user, stored, iterations)
        self._doomed = secret is None
        if secret is None:
            # Random keys keep the mock's final step doing the same work as a real one.
            random_key = secrets.token_bytes(_KEY_LEN)
            secret = ScramSecret(iterations, _user_salt(user), random_key, random_key)
        self._secret = secret
        self._stage = 0
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._cbind_input = ""

    def mechanisms(self) -> list[str]:
        """SASL mechanisms to offer in AuthenticationSASL."""
        return [SCRAM_SHA_256]

    def handle_client_first(self, data: bytes) -> bytes:
        """client-first-message (SASLInitialResponse data) -> server-first-message."""
        self._advance(0)
        message = _text(data)
        flag = message[:1]
        if flag == "p":
            raise AuthFailed("client requires SCRAM channel binding, but it is not supported")
        if flag not in _CBIND_INPUT:
            raise AuthFailed("malformed SCRAM message (unexpected channel-binding flag)")
        if message[1:2] != ",":
            raise AuthFailed("malformed SCRAM message (comma expected after channel-binding flag)")
        if message[2:3] == "a":
            raise AuthFailed("client uses authorization identity, but it is not supported")
        if message[2:3] != ",":
            raise AuthFailed("malformed SCRAM message (unexpected gs2 header attribute)")
        bare = message[3:]
        if bare[:1] == "m":
            raise AuthFailed("client requires an unsupported SCRAM extension")
        attributes = bare.split(",")
        # The user name in n= is ignored, as PostgreSQL does: the startup packet named the user.
        if len(attributes) < 2 or attributes[0][:2] != "n=" or attributes[1][:2] != "r=":
            raise AuthFailed("malformed SCRAM message (expected n= and r= in client-first-message)")
        client_nonce = attributes[1][2:]
        if not _is_printable(client_nonce):
            raise AuthFailed("non-printable characters in SCRAM nonce")
        _check_extensions(attributes[2:])
        server_nonce = _b64encode(secrets.token_bytes(_RAW_NONCE_LEN))
        self._nonce = client_nonce + server_nonce
        self._cbind_input = _CBIND_INPUT[flag]
        self._client_first_bare = bare
        self._server_first = (
            f"r={self._nonce},s={_b64encode(self._secret.salt)},i={self._secret.iterations}"
        )
        self._stage = 1
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        """client-final-message (SASLResponse data) -> server-final-message, if the proof holds."""
        self._advance(1)
        message = _text(data)
        without_proof, separator, encoded_proof = message.rpartition(",p=")
        if not separator:
            raise AuthFailed("could not read proof")
        attributes = without_proof.split(",")
        if attributes[0] != "c=" + self._cbind_input:
            raise AuthFailed("unexpected SCRAM channel-binding attribute in client-final-message")
        if len(attributes) < 2 or attributes[1] != "r=" + self._nonce:
            raise AuthFailed("invalid SCRAM response (nonce mismatch)")
        _check_extensions(attributes[2:])
        proof = _b64decode(encoded_proof)
        if proof is None or len(proof) != _KEY_LEN:
            raise AuthFailed("malformed SCRAM message (malformed proof in client-final-message)")
        auth_message = _auth_message(self._client_first_bare, self._server_first, without_proof)
        client_key = _xor(proof, _hmac(self._secret.stored_key, auth_message))
        matches = hmac.compare_digest(hashlib.sha256(client_key).digest(), self._secret.stored_key)
        if self._doomed or not matches:
            raise AuthFailed("password authentication failed (wrong SCRAM proof)")
        self._stage = 2
        if self._passthrough:
            self.client_key = client_key
            self.server_key = self._secret.server_key
        return b"v=" + _b64encode(_hmac(self._secret.server_key, auth_message)).encode("ascii")

    def _advance(self, expected: int) -> None:
        if self._stage != expected:
            raise AuthFailed("SCRAM message out of sequence")
        # Any failure below leaves the exchange unusable; success sets the next stage.
        self._stage = -1


class ScramClient:
    """pgherd's side of a SCRAM-SHA-256 login to PostgreSQL.

    Give either the ``password`` (plaintext, as from auth_file) or, for SCRAM passthrough,
    the ``client_key`` and ``server_key`` a :class:`ScramServer` recovered; the latter only work
    when the server holds the same SCRAM secret (same salt and iterations) as pgherd.
    """

    def __init__(
        self,
        *,
        password: str | bytes | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
    ) -> None:
        credential: str | bytes | tuple[bytes, bytes]
        if password is not None and client_key is None and server_key is None:
            if isinstance(password, str) and parse_scram_secret(password) is not None:
                raise AuthFailed(
                    "cannot do SCRAM authentication: password is SCRAM secret"
                    " but client authentication did not provide SCRAM keys"
                )
            if isinstance(password, str) and is_md5_secret(password):
                raise AuthFailed("cannot do SCRAM authentication: wrong password type")
            credential = password
        elif password is None and client_key is not None and server_key is not None:
            if len(client_key) != _KEY_LEN or len(server_key) != _KEY_LEN:
                raise ValueError(f"SCRAM keys are {_KEY_LEN} bytes")
            credential = (client_key, server_key)
        else:
            raise TypeError("ScramClient takes password= or both client_key= and server_key=")
        self._credential = credential
        self._stage = 0
        self._client_nonce = ""
        self._client_first_bare = ""
        self._server_signature = b""

    def client_first(self) -> bytes:
        """The client-first-message for SASLInitialResponse (mechanism SCRAM-SHA-256)."""
        self._advance(0)
        self._client_nonce = _b64encode(secrets.token_bytes(_RAW_NONCE_LEN))
        # libpq leaves the user name empty: PostgreSQL takes it from the startup packet.
        self._client_first_bare = f"n=,r={self._client_nonce}"
        self._stage = 1
        return b"n,," + self._client_first_bare.encode("ascii")

    def handle_server_first(self, data: bytes) -> bytes:
        """server-first-message (AuthenticationSASLContinue) -> client-final-message."""
        self._advance(1)
        server_first = _text(data)
        if server_first.startswith("e="):
            raise AuthFailed(f"error received from server in SCRAM exchange: {server_first[2:]}")
        match = _SERVER_FIRST.fullmatch(server_first)
        if match is None:
            raise AuthFailed("malformed SCRAM message (invalid server-first-message)")
        nonce, salt, iterations = match[1], _b64decode(match[2]), int(match[3])
        if len(nonce) <= len(self._client_nonce) or not nonce.startswith(self._client_nonce):
            raise AuthFailed("invalid SCRAM response (nonce mismatch)")
        if not _is_printable(nonce):
            raise AuthFailed("non-printable characters in SCRAM nonce")
        if not salt:
            raise AuthFailed("malformed SCRAM message (invalid salt)")
        if not 0 < iterations <= _MAX_ITERATIONS:
            raise AuthFailed("malformed SCRAM message (invalid iteration count)")
        if isinstance(self._credential, tuple):
            client_key, server_key = self._credential
            stored_key = hashlib.sha256(client_key).digest()
        else:
            client_key, stored_key, server_key = _scram_keys(self._credential, salt, iterations)
        without_proof = f"c={_CBIND_INPUT['n']},r={nonce}"
        auth_message = _auth_message(self._client_first_bare, server_first, without_proof)
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._stage = 2
        return f"{without_proof},p={_b64encode(proof)}".encode("ascii")

    def handle_server_final(self, data: bytes) -> None:
        """Check the server-final-message (AuthenticationSASLFinal): it must prove the server."""
        self._advance(2)
        server_final = _text(data)
        # RFC 5802 allows extensions after the verifier; none are defined, so they are ignored.
        attribute = server_final.split(",", 1)[0]
        if attribute.startswith("e="):
            raise AuthFailed(f"error received from server in SCRAM exchange: {attribute[2:]}")
        signature = _b64decode(attribute[2:]) if attribute.startswith("v=") else None
        if signature is None or len(signature) != _KEY_LEN:
            raise AuthFailed("malformed SCRAM message (malformed server signature)")
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed("failed to verify server signature")
        self._stage = 3

    def _advance(self, expected: int) -> None:
        if self._stage != expected:
            raise AuthFailed("SCRAM message out of sequence")
        self._stage = -1


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    # Latin-1 maps every byte to one code point and back, so the AuthMessage is rebuilt from
    # exactly the bytes the peer signed, whatever encoding its user name attribute used.
    data = bytes(data)
    if b"\x00" in data:
        raise AuthFailed("malformed SCRAM message (NUL byte)")
    return data.decode("latin-1")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_printable(nonce: str) -> bool:
    # RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except the comma.
    return bool(nonce) and all("!" <= c <= "~" and c != "," for c in nonce)


def _check_extensions(attributes: list[str]) -> None:
    for attribute in attributes:
        if _EXTENSION.fullmatch(attribute) is None or attribute[0] == "p":
            raise AuthFailed("malformed SCRAM message (invalid attribute)")


def _auth_message(client_first_bare: str, server_first: str, final_without_proof: str) -> bytes:
    return f"{client_first_bare},{server_first},{final_without_proof}".encode("latin-1")


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _md5_salted(inner_hex: str, salt: bytes) -> bytes:
    return b"md5" + hashlib.md5(inner_hex.encode("ascii") + bytes(salt)).hexdigest().encode("ascii")


def _sasl_prepare(password: str | bytes) -> bytes:
    """SASLprep the password as PostgreSQL does: if it is not valid UTF-8, is prohibited by
    SASLprep, or maps to nothing, the raw bytes are used unchanged."""
    raw = _bytes(password)
    try:
        prepared = saslprep(raw.decode("utf-8"))
    except (UnicodeDecodeError, ScramException):
        return raw
    return prepared.encode("utf-8") if prepared else raw


def _scram_keys(password: str | bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) for a password."""
    salted = hashlib.pbkdf2_hmac("sha256", _sasl_prepare(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")


def _user_salt(user: str) -> bytes:
    return _hmac(_PROCESS_KEY, b"salt\x00" + _bytes(user))[:_SALT_LEN]


# PBKDF2 per login would cost milliseconds of the worker's hub each time; the key includes the
# password, so a reload that changes it simply misses the cache.
@functools.lru_cache(maxsize=1024)
def _adhoc_secret(user: str, password: str, iterations: int) -> ScramSecret:
    salt = _user_salt(user)
    _, stored_key, server_key = _scram_keys(password, salt, iterations)
    return ScramSecret(iterations, salt, stored_key, server_key)
