"""Unit tests for workers.auth: secrets, md5, cleartext and both SCRAM directions.

Expected values are computed independently (hashlib for md5, scramp for SCRAM secrets and as the
client peer), so the tests do not just replay the module's own arithmetic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random

import pytest
import scramp

from workers.auth import (
    AuthFailed,
    ScramClient,
    ScramSecret,
    ScramServer,
    is_md5_secret,
    md5_client_response,
    md5_secret,
    md5_verify,
    parse_scram_secret,
    plain_verify,
)

SALT = b"\x01\x02\x03\x04"
MECH = scramp.ScramMechanism("SCRAM-SHA-256")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scram_secret_string(password: str, iterations: int = 4096, salt: bytes | None = None) -> str:
    """A secret as PostgreSQL writes it (16-byte random salt unless given), built by scramp."""
    salt = os.urandom(16) if salt is None else salt
    salt, stored_key, server_key, iterations = MECH.make_auth_info(password, iterations, salt)
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def expected_md5_response(password: str, user: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()


def client_key_from_password(password: str, salt: bytes, iterations: int) -> bytes:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return hmac.new(salted, b"Client Key", hashlib.sha256).digest()


def run_scramp_client(server: ScramServer, password: str, **client_kwargs) -> scramp.ScramClient:
    """Drive a full exchange with scramp as the client; raises AuthFailed from the server."""
    client = scramp.ScramClient(["SCRAM-SHA-256"], "ignored-user", password, **client_kwargs)
    server_first = server.handle_client_first(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    server_final = server.handle_client_final(client.get_client_final().encode())
    client.set_server_final(server_final.decode())  # raises if our ServerSignature is wrong
    return client


def run_scram_client(server: ScramServer, client: ScramClient) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.handle_server_final(server_final)


def salt_of(server_first: bytes) -> str:
    return dict(attr.split("=", 1) for attr in server_first.decode().split(","))["s"]


# --- secrets -----------------------------------------------------------------------------


def test_md5_secret_matches_hashlib() -> None:
    assert md5_secret("alice", "secret") == "md5" + hashlib.md5(b"secretalice").hexdigest()
    assert md5_secret("bob", "pw") == "md5" + hashlib.md5(b"pwbob").hexdigest()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("md5" + "0123456789abcdef" * 2, True),
        (md5_secret("u", "p"), True),
        ("md5" + "0123456789ABCDEF" * 2, False),  # PostgreSQL only writes lowercase hex
        ("md5" + "0" * 31, False),
        ("md5" + "0" * 33, False),
        ("md5" + "0" * 32 + "\n", False),
        ("MD5" + "0" * 32, False),
        ("plain password", False),
        ("", False),
    ],
)
def test_is_md5_secret(value: str, expected: bool) -> None:
    assert is_md5_secret(value) is expected


def test_parse_scram_secret_roundtrip() -> None:
    salt = bytes(range(16))
    secret = scram_secret_string("pw", 4096, salt)
    _, stored_key, server_key, _ = MECH.make_auth_info("pw", 4096, salt)
    assert parse_scram_secret(secret) == ScramSecret(4096, salt, stored_key, server_key)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain",
        md5_secret("u", "p"),
        "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(32)),  # no ServerKey
        "SCRAM-SHA-1$4096:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$0:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$-1:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$x:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$99999999999:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$4096:not*b64$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(31)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(33)),
        "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)) + ":x",
        " SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
    ],
)
def test_parse_scram_secret_rejects(value: str) -> None:
    assert parse_scram_secret(value) is None


# --- md5 ---------------------------------------------------------------------------------


def test_md5_verify_plaintext_and_md5_stored() -> None:
    response = expected_md5_response("secret", "alice", SALT)
    assert md5_verify("secret", "alice", SALT, response)
    assert md5_verify(md5_secret("alice", "secret"), "alice", SALT, response)


@pytest.mark.parametrize(
    ("stored", "user", "salt", "response"),
    [
        ("secret", "alice", SALT, expected_md5_response("wrong", "alice", SALT)),
        ("secret", "alice", SALT, expected_md5_response("secret", "bob", SALT)),  # user is salt too
        ("secret", "alice", b"\x09\x09\x09\x09", expected_md5_response("secret", "alice", SALT)),
        ("secret", "alice", SALT, expected_md5_response("secret", "alice", SALT).upper()),
        ("secret", "alice", SALT, b""),
        ("secret", "alice", SALT, b"garbage"),
        ("", "alice", SALT, expected_md5_response("", "alice", SALT)),  # empty never logs in
        (scram_secret_string("secret"), "alice", SALT, expected_md5_response("secret", "alice", SALT)),
    ],
)
def test_md5_verify_rejects(stored: str, user: str, salt: bytes, response: bytes) -> None:
    assert not md5_verify(stored, user, salt, response)


def test_md5_verify_does_not_treat_scram_secret_as_password() -> None:
    secret = scram_secret_string("secret")
    assert not md5_verify(secret, "alice", SALT, expected_md5_response(secret, "alice", SALT))


def test_md5_client_response() -> None:
    expected = expected_md5_response("secret", "alice", SALT)
    assert md5_client_response("alice", "secret", SALT) == expected
    assert md5_client_response("alice", md5_secret("alice", "secret"), SALT) == expected
    assert md5_verify("secret", "alice", SALT, md5_client_response("alice", "secret", SALT))


def test_md5_client_response_refuses_scram_secret() -> None:
    with pytest.raises(AuthFailed, match="wrong password type"):
        md5_client_response("alice", scram_secret_string("secret"), SALT)


# --- cleartext ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [pytest.param("s3cret pw", id="plain"), pytest.param(md5_secret("alice", "s3cret pw"), id="md5"),
     pytest.param(scram_secret_string("s3cret pw"), id="scram")],
)
def test_plain_verify(stored: str) -> None:
    assert plain_verify(stored, "alice", "s3cret pw")
    assert plain_verify(stored, "alice", b"s3cret pw")
    assert not plain_verify(stored, "alice", "s3cret pw ")
    assert not plain_verify(stored, "alice", "")


def test_plain_verify_md5_is_bound_to_user() -> None:
    assert not plain_verify(md5_secret("alice", "pw"), "bob", "pw")


def test_plain_verify_empty_stored_never_matches() -> None:
    assert not plain_verify("", "alice", "")
    assert not plain_verify("", "alice", "x")


def test_plain_verify_scram_uses_saslprep() -> None:
    # U+2168 ROMAN NUMERAL NINE normalises (NFKC) to "IX": both spell the same SCRAM password.
    stored = scram_secret_string("IX")
    assert plain_verify(stored, "alice", "\u2168")
    assert plain_verify(stored, "alice", "\u2168".encode())


def test_plain_verify_scram_prohibited_password_uses_raw_bytes() -> None:
    # A control character is prohibited by SASLprep; PostgreSQL then hashes the raw bytes.
    salt = bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", b"a\x07b", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored = (
        f"SCRAM-SHA-256$4096:{b64(salt)}$"
        f"{b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"
    )
    assert plain_verify(stored, "alice", "a\x07b")


# --- SCRAM server ------------------------------------------------------------------------


def test_scram_server_with_scram_secret_and_client_key() -> None:
    salt = bytes(range(16))
    server = ScramServer("alice", scram_secret_string("sc pw", 4096, salt))
    assert server.mechanisms() == ["SCRAM-SHA-256"]
    run_scramp_client(server, "sc pw")
    assert server.client_key == client_key_from_password("sc pw", salt, 4096)
    assert server.server_key == parse_scram_secret(scram_secret_string("sc pw", 4096, salt)).server_key


def test_scram_server_with_plaintext_has_no_passthrough_keys() -> None:
    server = ScramServer("alice", "sc pw", iterations=4096)
    run_scramp_client(server, "sc pw")
    assert server.client_key is None and server.server_key is None


def test_scram_server_plaintext_uses_given_iterations() -> None:
    server = ScramServer("alice", "pw", iterations=5000)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pw")
    server_first = server.handle_client_first(client.get_client_first().encode())
    assert server_first.endswith(b",i=5000")


def test_scram_server_plaintext_salt_is_stable_per_user() -> None:
    # A fresh random salt per attempt would reveal "this user exists" next to the mock's
    # stable salt; the ad-hoc secret's salt is stable per user name instead.
    first = ScramServer("alice", "pw").handle_client_first(b"n,,n=,r=abc")
    again = ScramServer("alice", "pw").handle_client_first(b"n,,n=,r=abc")
    other = ScramServer("bob", "pw").handle_client_first(b"n,,n=,r=abc")
    assert salt_of(first) == salt_of(again) != salt_of(other)


@pytest.mark.parametrize("stored", ["right", scram_secret_string("right")], ids=["plain", "scram"])
def test_scram_server_wrong_password(stored: str) -> None:
    server = ScramServer("alice", stored)
    with pytest.raises(AuthFailed):
        run_scramp_client(server, "wrong")
    assert server.client_key is None


@pytest.mark.parametrize("stored", [None, "", md5_secret("ghost", "pw")], ids=["unknown", "empty", "md5"])
def test_scram_server_mock_always_fails(stored: str | None) -> None:
    server = ScramServer("ghost", stored)
    with pytest.raises(AuthFailed):
        run_scramp_client(server, "pw")
    assert server.client_key is None


def test_scram_server_mock_salt_is_stable_per_user() -> None:
    def first_salt(user: str, stored: str | None) -> str:
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, "pw")
        server_first = ScramServer(user, stored).handle_client_first(client.get_client_first().encode())
        client.set_server_first(server_first.decode())  # scramp accepts it as a normal one
        return salt_of(server_first)

    assert first_salt("ghost", None) == first_salt("ghost", None)
    assert first_salt("ghost", None) != first_salt("phantom", None)
    # An md5 secret cannot do SCRAM: it must look exactly like an unknown user.
    assert first_salt("ghost", md5_secret("ghost", "pw")) == first_salt("ghost", None)
    assert len(base64.b64decode(first_salt("ghost", None))) == 16


def test_scram_server_mock_server_first_has_real_shape() -> None:
    server_first = ScramServer("ghost", None).handle_client_first(b"n,,n=,r=clientnonce")
    real_first = ScramServer("alice", scram_secret_string("pw")).handle_client_first(b"n,,n=,r=clientnonce")
    shape = [attr[:2] for attr in server_first.decode().split(",")]
    assert shape == [attr[:2] for attr in real_first.decode().split(",")] == ["r=", "s=", "i="]
    assert len(server_first) == len(real_first)


def test_scram_server_accepts_gs2_y() -> None:
    # scramp sends "y,," when it could bind but the mechanism chosen has no -PLUS.
    server = ScramServer("alice", scram_secret_string("pw"))
    client = run_scramp_client(server, "pw", channel_binding=("tls-unique", b"tls data"))
    assert client.gs2_header.gs2_char == "y"
    assert server.client_key is not None


def test_scram_server_rejects_gs2_p() -> None:
    server = ScramServer("alice", scram_secret_string("pw"))
    client = scramp.ScramClient(
        ["SCRAM-SHA-256-PLUS"], "alice", "pw", channel_binding=("tls-unique", b"tls data")
    )
    with pytest.raises(AuthFailed, match="channel binding"):
        server.handle_client_first(client.get_client_first().encode())


def test_scram_server_rejects_flag_switch_between_messages() -> None:
    # The client said 'n' first, then claims 'y' in the final message's channel binding.
    server = ScramServer("alice", "pw")
    client = ScramClient(password="pw")
    server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed, match="channel-binding"):
        server.handle_client_final(b"c=eSws,r=x,p=" + b64(bytes(32)).encode())


BAD_CLIENT_FIRST = [
    b"",
    b"n",
    b"n,",
    b"x,,n=,r=abc",
    b"n,a=someone,n=,r=abc",
    b"n,x,n=,r=abc",
    b"n,,",
    b"n,,m=ext,n=,r=abc",
    b"n,,r=abc",
    b"n,,n=",
    b"n,,n=,r=",
    b"n,,n=,r=ab,c",
    b"n,,n=,r=a b",
    b"n,,n=,r=ab\xff",
    b"n,,n=,r=abc\x00",
    b"n,,n=,r=abc,",
    b"n,,n=,r=abc,1=x",
    b"n,,n=,r=abc,noequals",
    b"n,,n=\xff\xfe,r=abc,p=proof-not-allowed-here",
    b"\xff\xff\xff",
]


@pytest.mark.parametrize("data", BAD_CLIENT_FIRST)
def test_scram_server_malformed_client_first(data: bytes) -> None:
    with pytest.raises(AuthFailed):
        ScramServer("alice", "pw").handle_client_first(data)


def test_scram_server_ignores_user_name_and_extensions_in_client_first() -> None:
    server = ScramServer("alice", "pw")
    server_first = server.handle_client_first(b"y,,n=anything\xe9,r=abc,x=ext")
    assert server_first.startswith(b"r=abc")


def _server_after_first() -> tuple[ScramServer, str]:
    server = ScramServer("alice", "pw")
    nonce = dict(a.split("=", 1) for a in server.handle_client_first(b"n,,n=,r=abc").decode().split(","))["r"]
    return server, nonce


@pytest.mark.parametrize(
    "template",
    [
        "",
        "c=biws",
        "c=biws,r={nonce}",
        "c=biws,r={nonce},p=",
        "c=biws,r={nonce},p=!!!",
        "c=biws,r={nonce},p=" + b64(bytes(31)),
        "c=biws,r={nonce},p=" + b64(bytes(32)) + ",x=trailing",
        "c=biws,r={nonce}x,p=" + b64(bytes(32)),
        "c=biws,r=abc,p=" + b64(bytes(32)),
        "c=eSws,r={nonce},p=" + b64(bytes(32)),
        "c=cD10bHMtdW5pcXVlLCw=,r={nonce},p=" + b64(bytes(32)),
        "r={nonce},c=biws,p=" + b64(bytes(32)),
        "c=biws,r={nonce},p=" + b64(bytes(32)) + ",p=" + b64(bytes(32)),
        "c=biws,r={nonce},1=x,p=" + b64(bytes(32)),
        "c=biws,r={nonce},p=" + b64(bytes(32)) + "\x00",
        "c=biws,r={nonce},p=" + b64(bytes(32)),  # well-formed, wrong proof
        "c=biws,r={nonce}\xe9,p=" + b64(bytes(32)),
    ],
)
def test_scram_server_malformed_or_wrong_client_final(template: str) -> None:
    server, nonce = _server_after_first()
    with pytest.raises(AuthFailed):
        server.handle_client_final(template.format(nonce=nonce).encode("latin-1"))


def test_scram_server_out_of_sequence() -> None:
    with pytest.raises(AuthFailed):
        ScramServer("alice", "pw").handle_client_final(b"c=biws,r=abc,p=" + b64(bytes(32)).encode())
    server = ScramServer("alice", "pw")
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(AuthFailed):
        server.handle_client_first(b"n,,n=,r=abc")


def test_scram_server_failed_exchange_cannot_be_retried() -> None:
    server, nonce = _server_after_first()
    with pytest.raises(AuthFailed):
        server.handle_client_final(f"c=biws,r={nonce},p={b64(bytes(32))}".encode())
    with pytest.raises(AuthFailed, match="sequence"):
        server.handle_client_final(f"c=biws,r={nonce},p={b64(bytes(32))}".encode())


def test_scram_server_fuzz_raises_only_auth_failed() -> None:
    rng = random.Random(5802)
    alphabet = b"nyp,=arcmx" + bytes(range(0x21, 0x7F)) + b"\x00\xff"
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        server = ScramServer("alice", "pw")
        try:
            server.handle_client_first(b"n,,n=,r=abc")
            server.handle_client_final(data)
        except AuthFailed:
            pass
        try:
            ScramServer("alice", None).handle_client_first(data)
        except AuthFailed:
            pass


# --- SCRAM client ------------------------------------------------------------------------


def test_scram_client_first_has_empty_user_name() -> None:
    first = ScramClient(password="pw").client_first()
    assert first.startswith(b"n,,n=,r=")
    assert len(first) == len(b"n,,n=,r=") + 24  # 18 random bytes, base64


@pytest.mark.parametrize("stored", ["sc pw", scram_secret_string("sc pw")], ids=["plain", "scram"])
def test_scram_client_password_against_scram_server(stored: str) -> None:
    run_scram_client(ScramServer("alice", stored), ScramClient(password="sc pw"))


def test_scram_client_saslprep_matches_server() -> None:
    run_scram_client(ScramServer("alice", scram_secret_string("IX")), ScramClient(password="\u2168"))
    run_scram_client(ScramServer("alice", "a\x07b"), ScramClient(password=b"a\x07b"))


def test_scram_client_wrong_password_is_refused_by_server() -> None:
    server = ScramServer("alice", scram_secret_string("sc pw"))
    client = ScramClient(password="nope")
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed):
        server.handle_client_final(client.handle_server_first(server_first))


def test_scram_client_passthrough_keys() -> None:
    secret = scram_secret_string("sc pw")
    front = ScramServer("alice", secret)
    run_scramp_client(front, "sc pw")
    assert front.client_key is not None and front.server_key is not None
    # The keys alone, without the password, log in wherever the same secret is stored.
    run_scram_client(
        ScramServer("alice", secret), ScramClient(client_key=front.client_key, server_key=front.server_key)
    )


def test_scram_client_passthrough_keys_fail_against_other_salt() -> None:
    front = ScramServer("alice", scram_secret_string("sc pw"))
    run_scramp_client(front, "sc pw")
    server = ScramServer("alice", scram_secret_string("sc pw"))  # same password, new salt
    client = ScramClient(client_key=front.client_key, server_key=front.server_key)
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed):
        server.handle_client_final(client.handle_server_first(server_first))


def _client_after_first() -> tuple[ScramClient, str]:
    client = ScramClient(password="pw")
    client_nonce = client.client_first().decode().split("r=", 1)[1]
    return client, client_nonce


def test_scram_client_rejects_bad_server_signature() -> None:
    server = ScramServer("alice", "pw")
    client = ScramClient(password="pw")
    server_first = server.handle_client_first(client.client_first())
    server.handle_client_final(client.handle_server_first(server_first))
    with pytest.raises(AuthFailed, match="failed to verify server signature"):
        client.handle_server_final(b"v=" + b64(bytes(32)).encode())


def test_scram_client_reports_server_error() -> None:
    server = ScramServer("alice", "pw")
    client = ScramClient(password="pw")
    client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(AuthFailed, match="invalid-proof"):
        client.handle_server_final(b"e=invalid-proof")


@pytest.mark.parametrize(
    "template",
    [
        "",
        "e=other-error",
        "r={cn}",
        "r={cn},s=c2FsdA==,i=4096",  # server added no nonce of its own
        "r=other{cn}srv,s=c2FsdA==,i=4096",
        "r={cn}srv,s=,i=4096",
        "r={cn}srv,s=!!,i=4096",
        "r={cn}srv,s=c2FsdA==,i=0",
        "r={cn}srv,s=c2FsdA==,i=-1",
        "r={cn}srv,s=c2FsdA==,i=99999999999",
        "r={cn}srv,s=c2FsdA==,i=4096,x=garbage",
        "r={cn}sr v,s=c2FsdA==,i=4096",
        "r={cn}srv\xe9,s=c2FsdA==,i=4096",
        "r={cn}srv,s=c2Fs\xe9A==,i=4096",
        "s=c2FsdA==,r={cn}srv,i=4096",
        "r={cn}srv,s=c2FsdA==,i=4096\x00",
    ],
)
def test_scram_client_malformed_server_first(template: str) -> None:
    client, client_nonce = _client_after_first()
    with pytest.raises(AuthFailed):
        client.handle_server_first(template.format(cn=client_nonce).encode("latin-1"))


@pytest.mark.parametrize("data", [b"", b"v=", b"v=!!", b"v=" + b64(bytes(31)).encode(), b"x=1", b"\x00"])
def test_scram_client_malformed_server_final(data: bytes) -> None:
    server = ScramServer("alice", "pw")
    client = ScramClient(password="pw")
    client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(AuthFailed):
        client.handle_server_final(data)


def test_scram_client_out_of_sequence() -> None:
    with pytest.raises(AuthFailed):
        ScramClient(password="pw").handle_server_first(b"r=a,s=c2FsdA==,i=1")
    client = ScramClient(password="pw")
    client.client_first()
    with pytest.raises(AuthFailed):
        client.client_first()


def test_scram_client_refuses_secrets_as_password() -> None:
    with pytest.raises(AuthFailed, match="did not provide SCRAM keys"):
        ScramClient(password=scram_secret_string("pw"))
    with pytest.raises(AuthFailed, match="wrong password type"):
        ScramClient(password=md5_secret("alice", "pw"))


def test_scram_client_constructor_misuse() -> None:
    with pytest.raises(TypeError):
        ScramClient()
    with pytest.raises(TypeError):
        ScramClient(password="pw", client_key=bytes(32), server_key=bytes(32))
    with pytest.raises(TypeError):
        ScramClient(client_key=bytes(32))
    with pytest.raises(ValueError):
        ScramClient(client_key=bytes(31), server_key=bytes(32))


def test_scram_client_fuzz_raises_only_auth_failed() -> None:
    rng = random.Random(7677)
    alphabet = b"rsiev,=" + bytes(range(0x21, 0x7F)) + b"\x00\xff"
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        for as_server_first in (lambda nonce: data, lambda nonce: b"r=" + nonce.encode() + data):
            client, client_nonce = _client_after_first()
            try:
                client.handle_server_first(as_server_first(client_nonce))
            except AuthFailed:
                pass
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        # Passthrough keys skip PBKDF2, so every sample gets a fresh exchange cheaply.
        client = ScramClient(client_key=bytes(32), server_key=bytes(32))
        client_nonce = client.client_first().decode().split("r=", 1)[1]
        client.handle_server_first(f"r={client_nonce}srv,s=c2FsdA==,i=4096".encode())
        try:
            client.handle_server_final(data)
        except AuthFailed:
            pass
