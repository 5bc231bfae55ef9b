"""CURVE keys for the client-facing sockets, and the loopback rule.

Everything binds to loopback by default. The gateway may serve clients on another interface
(``gateway.host``) only with CURVE: it encrypts the connection and a ZAP handler admits only
clients whose public key is in the keys directory's ``authorized_clients/``. Layout of the keys
directory (``omnistream keys`` creates it; the directory is 0700 and every file 0600)::

    server.key           the gateway's public key (give it to clients)
    server.key_secret    the gateway's key pair (stays on the server)
    client.key           a client's public key
    client.key_secret    that client's key pair (give it, with server.key, to that client only)
    authorized_clients/  public keys of the clients the gateway admits (*.key)

Files are in ZeroMQ's certificate format (``zmq.auth.load_certificate`` reads them). Secret keys
are never logged or printed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
AUTHORIZED = "authorized_clients"
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})
ZAP_DOMAIN = "omnistream"

# The ZAP handler logs every refused client at DEBUG and more; keep it quiet unless asked.
logging.getLogger("zmq.auth").setLevel(logging.WARNING)


class SecurityError(RuntimeError):
    """Keys missing, unreadable or unsafe, or an address that needs them."""


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public interface


def endpoint_host(endpoint: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` endpoint; None for ``ipc://`` and ``inproc://``."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://") :]
    host, _, _ = rest.rpartition(":")
    return host


def needs_curve(endpoint: str) -> bool:
    host = endpoint_host(endpoint)
    return host is not None and not is_loopback(host)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from the start (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def _certificate(public: bytes, secret: bytes | None) -> str:
    lines = [
        f"#   ****  Generated on {time.strftime('%Y-%m-%d %H:%M:%S')} by omnistream keys  ****",
        "#   ZeroMQ CURVE " + ("**Secret** Certificate" if secret else "Public Certificate"),
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if secret else "",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def write_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """A new CURVE key pair as ``name.key`` (public) and ``name.key_secret``, both 0600."""
    _private_dir(directory)
    public, secret = zmq.curve_keypair()
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    _write_private(public_file, _certificate(public, None))
    _write_private(secret_file, _certificate(public, secret))
    return public_file, secret_file


def generate_keys(keys_dir: Path, client: str = "client", force: bool = False) -> dict[str, Path]:
    """Server pair (kept unless ``force``) and one client pair, authorised. Returns the paths."""
    if not client.replace("-", "").replace("_", "").isalnum():
        raise SecurityError(f"client name {client!r} must be letters, digits, '-' or '_'")
    if client == SERVER:
        raise SecurityError("the client name 'server' is reserved")
    _private_dir(keys_dir)
    _private_dir(keys_dir / AUTHORIZED)
    paths: dict[str, Path] = {}
    server_public = keys_dir / f"{SERVER}.key"
    if force or not (keys_dir / f"{SERVER}.key_secret").exists():
        write_keypair(keys_dir, SERVER)
    paths["server_public"] = server_public
    paths["server_secret"] = keys_dir / f"{SERVER}.key_secret"
    client_public, client_secret = write_keypair(keys_dir, client)
    authorized = keys_dir / AUTHORIZED / f"{client}.key"
    _write_private(authorized, client_public.read_text())
    paths.update(client_public=client_public, client_secret=client_secret, authorized=authorized)
    return paths


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise SecurityError(f"missing key file {path}; create keys with `omnistream keys`")
    if need_secret and path.stat().st_mode & 0o077:
        raise SecurityError(
            f"secret key file {path} is readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600 it"
        )
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise SecurityError(f"cannot read key file {path}: {exc}") from None
    if need_secret and not secret:
        raise SecurityError(f"key file {path} holds no secret key")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized_dir: Path
    authorized: int  # number of client keys admitted


def load_server_keys(keys_dir: Path) -> ServerKeys:
    """The gateway's pair and the authorised clients; raises ``SecurityError`` naming what is missing."""
    public, secret = _load(keys_dir / f"{SERVER}.key_secret", need_secret=True)
    authorized_dir = keys_dir / AUTHORIZED
    count = len(list(authorized_dir.glob("*.key"))) if authorized_dir.is_dir() else 0
    if not count:
        raise SecurityError(
            f"no authorised client keys in {authorized_dir}; add one with `omnistream keys --client NAME`"
        )
    assert secret is not None
    return ServerKeys(public, secret, authorized_dir, count)


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def load_client_keys(keys_dir: Path, client: str = "client") -> ClientKeys:
    public, secret = _load(keys_dir / f"{client}.key_secret", need_secret=True)
    server_public, _ = _load(keys_dir / f"{SERVER}.key", need_secret=False)
    assert secret is not None
    return ClientKeys(public, secret, server_public)


def start_authenticator(ctx: zmq.Context, keys: ServerKeys) -> ThreadAuthenticator:
    """ZAP handler on ``ctx`` admitting only the authorised client keys (others are refused)."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("zmq.auth"))
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys.authorized_dir))
    return auth


def make_curve_server(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Before bind: this socket only talks CURVE, with clients the authenticator admits."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def make_curve_client(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Before connect."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
