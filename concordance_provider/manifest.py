"""The application manifest: a wadm-style ``Application`` YAML, as wasmCloud users write it.

Each component names its Wasm file (``properties.image: file://...``, relative to the manifest)
and, optionally, its Python source folder (``properties.source``, from which ``concordance deploy``
builds it for a wasmCloud host), and carries a ``link`` trait whose target is the Concordance provider and whose values hold
ROLE, INTEREST, NAME, KEY. Both wadm link shapes are read: ``values: {...}`` and
``source: {config: [{properties: {...}}]}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .links import Interest, LinkError, parse_interest

PROVIDER_NAMES = {"concordance", "concordance-provider"}


class ManifestError(Exception):
    """A manifest that cannot be run, with what is wrong and where."""


class Grants(BaseModel):
    """What a component may reach beyond its sandbox (a Concordance extension of properties)."""

    model_config = ConfigDict(extra="forbid")
    env: dict[str, str] = Field(default_factory=dict)
    dirs: dict[str, str] = Field(default_factory=dict)  # guest path -> host directory, read-only


class ComponentSpec(BaseModel):
    """One linked component and where it runs: in-process from ``path``, or on a wasmCloud host
    answering on ``dispatch_subject``."""

    name: str
    interest: Interest
    path: Path | None = None
    dispatch_subject: str | None = None
    source: Path | None = None
    grants: Grants = Field(default_factory=Grants)
    link_values: dict[str, str] = Field(default_factory=dict)  # as written, to pass the link on

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else f"nats:{self.dispatch_subject}"


class Manifest(BaseModel):
    name: str
    components: list[ComponentSpec]


def _link_values(link: dict[str, Any]) -> dict[str, str]:
    props = link.get("properties") or {}
    values: dict[str, Any] = dict(props.get("values") or {})
    for config in ((props.get("source") or {}).get("config") or []):
        values.update((config or {}).get("properties") or {})
    return {str(k): _link_value(v) for k, v in values.items() if v is not None}


def _link_value(value: Any) -> str:
    """YAML may give a process-manager INTEREST as a mapping: it means its JSON."""
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _target_name(link: dict[str, Any]) -> str:
    target = (link.get("properties") or {}).get("target")
    return str(target.get("name", "")) if isinstance(target, dict) else str(target or "")


def _image_path(image: str, base: Path, component: str) -> Path:
    parsed = urlparse(image)
    looks_like_registry = not parsed.scheme and not image.startswith((".", "/")) and (
        ":" in image or "." in image.split("/", 1)[0]) and not image.endswith(".wasm")
    if parsed.scheme not in ("", "file") or looks_like_registry:
        raise ManifestError(
            f"component {component!r}: image {image!r} is not a local file; the embedded runtime "
            f"runs file:// images (relative paths are relative to the manifest)"
        )
    raw = unquote(parsed.netloc + parsed.path) if parsed.scheme else image
    path = Path(raw)
    return path if path.is_absolute() else (base / path).resolve()


def _providers(components: list[dict[str, Any]]) -> set[str]:
    return PROVIDER_NAMES | {str(c.get("name")) for c in components if c.get("type") == "capability"}


def _source_dir(props: dict[str, Any], base: Path, component: str) -> Path | None:
    raw = props.get("source")
    if raw is None:
        return None
    path = Path(str(raw))
    return path if path.is_absolute() else (base / path).resolve()  # checked by whoever builds it


def _component_spec(raw: dict[str, Any], providers: set[str], base: Path) -> ComponentSpec | None:
    name = str(raw.get("name") or "")
    links = [t for t in raw.get("traits") or [] if t.get("type") == "link" and _target_name(t) in providers]
    if not links:
        return None
    if len(links) > 1:
        raise ManifestError(f"component {name!r} has {len(links)} links to Concordance; give it one")
    props = raw.get("properties") or {}
    image = props.get("image")
    if not image:
        raise ManifestError(f"component {name!r} has no properties.image")
    values = _link_values(links[0])
    try:
        interest = parse_interest(values)
        grants = Grants.model_validate(props.get("grants") or {})
    except (LinkError, ValidationError) as exc:
        raise ManifestError(f"component {name!r}: {exc}") from None
    return ComponentSpec(name=name, path=_image_path(str(image), base, name), interest=interest, grants=grants,
                         source=_source_dir(props, base, name), link_values=values)


def load_manifest(path: Path, need_files: bool = True) -> Manifest:
    """Read and check a manifest; ``need_files`` False when its components are to be built and
    deployed elsewhere rather than run from their files here."""
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "Application":
        raise ManifestError(f"manifest {path} must be a wadm Application (kind: Application)")
    raw_components = (doc.get("spec") or {}).get("components")
    if not isinstance(raw_components, list) or not raw_components:
        raise ManifestError(f"manifest {path} has no spec.components")
    providers = _providers(raw_components)
    specs = [s for s in (_component_spec(c, providers, path.parent) for c in raw_components) if s]
    if not specs:
        raise ManifestError(f"manifest {path} links no component to Concordance")
    missing = [f"{s.name} ({s.path})" for s in specs if s.path is not None and not s.path.is_file()]
    if missing and need_files:
        raise ManifestError(f"component file(s) not found: {', '.join(missing)}; build them first (make examples)")
    _check_unique(specs)
    return Manifest(name=str((doc.get("metadata") or {}).get("name", path.stem)), components=specs)


def _check_unique(specs: list[ComponentSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        consumer = spec.interest.consumer_name
        if consumer in seen:
            raise ManifestError(f"components {seen[consumer]!r} and {spec.name!r} both declare {consumer}")
        seen[consumer] = spec.name
