"""Image references, parsed the way docker parses them.

``ubuntu`` is ``docker.io/library/ubuntu:latest``; a first path component with
a dot, a colon or ``localhost`` is a registry. kiln needs the parts apart to
rewrite a reference onto a mirror (``<mirror>/<path>:<tag>``) and back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ci.images.docker_client import DockerError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_ADDRESS_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::(?P<port>\d{1,5}))?$")


class BadReference(DockerError, ValueError):
    """An image reference, mirror address or credential setting that cannot be used."""


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference: ``registry/path[:tag][@digest]``."""

    registry: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        return f"{self.registry}/{self.path}"

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def on(self, registry: str) -> "ImageRef":
        """The same repository path, tag and digest on another registry (a mirror)."""
        return replace(self, registry=registry)

    def __str__(self) -> str:
        return self.repository + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_ref(image: str) -> ImageRef:
    """Parse an image reference the way docker does (``ubuntu`` -> ``docker.io/library/ubuntu:latest``)."""
    text = image.strip()
    if not text:
        raise BadReference("empty image reference")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise BadReference(f"bad digest in image reference {image!r}: expected sha256:<64 hex>")
    name, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise BadReference(f"bad tag {tag!r} in image reference {image!r}")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not is_address(registry, port_required=False):
            raise BadReference(f"bad registry address {registry!r} in image reference {image!r}")
    else:
        registry, path = "docker.io", name
        if "/" not in path:
            path = f"library/{path}"
    if not _PATH_RE.match(path):
        raise BadReference(f"bad repository name {path!r} in image reference {image!r} (lowercase, digits, . _ - /)")
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, path, tag, digest or None)


def is_address(address: str, *, port_required: bool) -> bool:
    """True for ``host[:port]`` (hostname, IPv4 or [IPv6]); ``port_required`` for mirrors."""
    match = _ADDRESS_RE.match(address)
    port = match.group("port") if match else None
    return bool(match) and not (port_required and not port) and not (port and not 1 <= int(port) <= 65535)
