"""Pushing a provider archive to an OCI registry, and pulling it back, as wash and wasmCloud hosts do.

The OCI distribution API over HTTP(S), anonymously: each blob is uploaded (POST, then PUT with its
digest) unless the registry has it, then the manifest is put under the tag. wash pushes a PAR as
an OCI image manifest whose config blob is ``{}`` of type ``application/vnd.wasmcloud.provider.archive.config``
and whose single layer is the archive, of type ``application/vnd.wasmcloud.provider.archive.layer.v1+par``.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message

import structlog

log = structlog.get_logger(__name__)

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
PAR_CONFIG_MEDIA_TYPE = "application/vnd.wasmcloud.provider.archive.config"
PAR_LAYER_MEDIA_TYPE = "application/vnd.wasmcloud.provider.archive.layer.v1+par"
PAR_CONFIG = b"{}"  # what wash pushes when given no config file
TIMEOUT_SECONDS = 60.0
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class RegistryError(RuntimeError):
    """The registry refused, could not be reached, or served something that is not the archive."""


@dataclass(frozen=True)
class Reference:
    """``registry/repository:tag``, e.g. ``127.0.0.1:5001/concordance:0.1.0``."""

    registry: str
    repository: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> "Reference":
        """ValueError saying what is wrong. Like wash, the reference is lower-cased, a tag is needed
        and ``latest`` is refused (hosts refuse to run it unless told to)."""
        value = text.strip().lower()
        registry, _, rest = value.partition("/")
        if not rest or not ("." in registry or ":" in registry or registry == "localhost"):
            raise ValueError(f"{text!r} does not name a registry: write REGISTRY/NAME:TAG, e.g. "
                             f"127.0.0.1:5001/concordance:0.1.0")
        repository, colon, tag = rest.rpartition(":")
        if not colon or "/" in tag:
            raise ValueError(f"{text!r} has no tag: write REGISTRY/NAME:TAG (hosts refuse untagged references)")
        if tag == "latest":
            raise ValueError(f"{text!r}: the tag 'latest' is refused, as wash and wasmCloud hosts refuse it; "
                             f"name a version")
        if not _REPOSITORY.match(repository) or not _TAG.match(tag):
            raise ValueError(f"{text!r} is not a valid OCI reference")
        return cls(registry, repository, tag)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def par_manifest(archive: bytes) -> bytes:
    """The image manifest wash writes for a PAR, keys sorted as the Go registries store them."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": PAR_CONFIG_MEDIA_TYPE, "digest": digest_of(PAR_CONFIG), "size": len(PAR_CONFIG)},
        "layers": [{"mediaType": PAR_LAYER_MEDIA_TYPE, "digest": digest_of(archive), "size": len(archive)}],
    }
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


class RegistryClient:
    """One registry, over plain HTTP (``insecure``) or HTTPS, without credentials."""

    def __init__(self, registry: str, insecure: bool, timeout: float = TIMEOUT_SECONDS) -> None:
        self.base = f"{'http' if insecure else 'https'}://{registry}"
        self.timeout = timeout
        self._log = log.bind(registry=registry)

    def push_archive(self, reference: Reference, archive: bytes) -> str:
        """Push the PAR under the reference's tag; returns the manifest's digest."""
        for blob in (PAR_CONFIG, archive):
            self._upload_blob(reference.repository, blob)
        manifest = par_manifest(archive)
        response = self._request("PUT", f"/v2/{reference.repository}/manifests/{reference.tag}", manifest,
                                 {"Content-Type": MANIFEST_MEDIA_TYPE})
        digest = response.headers.get("Docker-Content-Digest") or digest_of(manifest)
        self._log.info("provider archive pushed", reference=str(reference), digest=digest, size=len(archive))
        return digest

    def pull_archive(self, reference: Reference) -> bytes:
        """The PAR a reference names, its layer's media type and digest checked."""
        response = self._request("GET", f"/v2/{reference.repository}/manifests/{reference.tag}", None,
                                 {"Accept": MANIFEST_MEDIA_TYPE})
        try:
            manifest = json.loads(response.body)
            layers = manifest["layers"]
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"{reference}: the registry's manifest is not an OCI image manifest") from None
        if len(layers) != 1 or layers[0].get("mediaType") != PAR_LAYER_MEDIA_TYPE:
            types = [layer.get("mediaType") for layer in layers]
            raise RegistryError(f"{reference} is not a provider archive: its layers are {types}, expected one "
                                f"{PAR_LAYER_MEDIA_TYPE}")
        digest = layers[0]["digest"]
        blob = self._request("GET", f"/v2/{reference.repository}/blobs/{digest}", None, {}).body
        if digest_of(blob) != digest:
            raise RegistryError(f"{reference}: the layer the registry served does not match its digest {digest}")
        return blob

    def _upload_blob(self, repository: str, blob: bytes) -> None:
        digest = digest_of(blob)
        if self._request("HEAD", f"/v2/{repository}/blobs/{digest}", None, {}, missing_ok=True).status == 200:
            return
        started = self._request("POST", f"/v2/{repository}/blobs/uploads/", b"", {"Content-Length": "0"})
        location = started.headers.get("Location")
        if not location:
            raise RegistryError("the registry started an upload but gave no Location to send it to")
        url = urllib.parse.urljoin(self.base + "/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        self._request("PUT", url, blob, {"Content-Type": "application/octet-stream"})

    def _request(self, method: str, path_or_url: str, body: bytes | None, headers: dict[str, str],
                 missing_ok: bool = False) -> "_Response":
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return _Response(response.status, response.headers, response.read())
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return _Response(404, exc.headers, b"")
            hint = " (this command pushes without credentials)" if exc.code == 401 else ""
            raise RegistryError(f"{method} {url}: {exc.code} {_registry_errors(exc.read())}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(f"cannot reach the registry at {self.base}: {reason}") from None


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Message  # case-insensitive lookups
    body: bytes


def _registry_errors(body: bytes) -> str:
    """The registry's own words: OCI error bodies are ``{"errors": [{"code", "message"}]}``."""
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or "no details"
