"""The coordinator's front door: nginx between the network and the SuperLink.

flwr 1.41's SuperLink serves all its APIs on one HTTPS address: the Fleet API (SuperNodes), the
Control API (the `flwr` CLI: registering node keys, submitting apps, whose code then runs on every
silo with the silo's data) and the Runtime API (its ServerApp processes). The open-source SuperLink
authenticates no Control or Runtime caller, so it binds loopback only and nginx (a well-kept proxy:
we do not write our own networking) faces the network with two listeners:

- the public one, the silos': TLS with the SuperLink's certificate; forwards `/v1/fleet/…` only and
  answers 404 to everything else;
- the operator's: TLS that requires a client certificate the deployment CA signed (the operator's,
  from `fedshop deploy certs`); forwards `/v1/control/…` only.

The `flwr` CLI cannot present a client certificate (its HTTP client takes a CA, nothing more), so an
operator elsewhere runs `fedshop deploy register|run` with the operator's credential: for as long as
the command runs, a second nginx on the operator's host (`write_operator_bridge`) takes the CLI's
requests on loopback and presents the certificate to the operator listener.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

from fedshop.config import Environment
from fedshop.errors import FedShopError

TEMPLATES = Path(__file__).parent / "nginx"
# Where nginx lives when it is not on PATH (Debian puts it in /usr/sbin, off a user's PATH).
_SBIN = ("/usr/sbin", "/usr/local/sbin")


class FrontDoorError(FedShopError):
    """nginx is missing, or an address the front door cannot serve."""


class _Template(Template):
    delimiter = "@"  # nginx's own variables start with "$"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """HOST:PORT, [IPv6]:PORT included."""
        host, sep, port = text.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        # Names, IPv4 and IPv6 addresses only: the host goes into nginx's config.
        valid = re.fullmatch(r"[A-Za-z0-9.:-]+", host) and port.isdigit()
        if not sep or not valid or not 0 < int(port) < 65536:
            raise FrontDoorError(f"{text!r} is not an address: give HOST:PORT")
        return cls(host, int(port))

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def nginx_binary() -> str:
    """The nginx to run: $FEDSHOP_NGINX, else nginx on PATH or in an sbin folder."""
    wanted = Environment.from_os().nginx or "nginx"
    found = shutil.which(wanted) or shutil.which(wanted, path=os.pathsep.join(_SBIN))
    if found is None:
        raise FrontDoorError(
            f"nginx not found ({wanted}): the coordinator's front door runs nginx. Install it "
            "(Debian/Ubuntu: sudo apt-get install nginx; Fedora: sudo dnf install nginx; "
            "macOS: brew install nginx) or set FEDSHOP_NGINX to its path"
        )
    return found


def nginx_command(config: Path) -> list[str]:
    """nginx in the foreground with `config`; -e: no early log in a system folder it may not write."""
    folder = config.parent
    return [nginx_binary(), "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(config)]


def write_front_door(
    folder: Path,
    superlink_port: int,
    ca: Path,
    certificate: Path,
    key: Path,
    public: Address,
    operator: Address | None,
) -> Path:
    """nginx's config for the coordinator's front door (`folder`/nginx.conf, owner-only)."""
    files = {"ca": ca, "certificate": certificate, "key": key}
    values = {name: _checked(path) for name, path in files.items()}
    _check_names_localhost(Path(values["certificate"]))
    operator_server = (
        _render("operator-server.conf", operator=str(operator), **values) if operator else ""
    )
    servers = _render(
        "front-door.conf", superlink_port=str(superlink_port), public=str(public),
        operator_server=operator_server, **values,
    )  # fmt: skip
    return _write_config(folder, "front-door.conf", servers)


def write_operator_bridge(
    folder: Path, remote: Address, port: int, ca: Path, certificate: Path, key: Path
) -> Path:
    """nginx's config for the operator's side: loopback `port` to `remote`'s operator listener."""
    if remote.is_ip:
        # nginx checks the server certificate's DNS names only: an IP address never matches.
        raise FrontDoorError(
            f"give the coordinator by name, not by IP address ({remote}): one of the names its "
            "certificate was made for (fedshop deploy certs --host NAME)"
        )
    values = {"ca": ca, "certificate": certificate, "key": key}
    servers = _render(
        "operator-bridge.conf", remote=str(remote), remote_host=remote.host, port=str(port),
        **{name: _checked(path) for name, path in values.items()},
    )  # fmt: skip
    return _write_config(folder, "operator-bridge.conf", servers)


def _write_config(folder: Path, servers_template: str, servers: str) -> Path:
    folder = Path(_checked(folder, is_file=False))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # its logs name every caller; its config names the keys
    (folder / "tmp").mkdir(mode=0o700, exist_ok=True)
    text = _render(
        "common.conf", folder=str(folder), user=_worker_user(), servers=servers,
        servers_template=servers_template,
    )  # fmt: skip
    config = folder / "nginx.conf"
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)
    return config


def _check_names_localhost(certificate: Path) -> None:
    """nginx reaches the SuperLink on loopback and checks its certificate under "localhost"."""
    from cryptography import x509

    try:
        names = x509.load_pem_x509_certificate(certificate.read_bytes()).extensions
        dns = names.get_extension_for_class(x509.SubjectAlternativeName).value
        found = "localhost" in dns.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound):
        found = False
    if not found:
        raise FrontDoorError(
            f"{certificate} is not valid for localhost, where the front door reaches the "
            "SuperLink: make the certificates again with fedshop deploy certs (it adds localhost)"
        )


def _render(name: str, **values: str) -> str:
    return _Template((TEMPLATES / name).read_text()).substitute(values)


def _checked(path: Path, is_file: bool = True) -> str:
    path = Path(path).resolve()
    if is_file and not path.is_file():
        raise FrontDoorError(f"{path} does not exist")
    if any(c in str(path) for c in " ;{}\"'\\$#"):
        raise FrontDoorError(f"{path}: nginx's config cannot name a path with these characters")
    return str(path)


def _worker_user() -> str:
    """Run as root, nginx's workers (which talk to the network) drop to nobody; otherwise they stay
    the user who started it, and a `user` line would only add a warning."""
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
