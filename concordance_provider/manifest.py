"""The application manifest: a wadm ``Application`` YAML, as wasmCloud 1.x users write it.

A component is linked to Concordance by a ``link`` trait whose target is the Concordance provider.
Its link values (ROLE, INTEREST, NAME, KEY, ...) are read from the link's config, in either wadm
spelling: ``target: {name, config: [{name, properties}]}`` (and ``source: {config: [...]}``), or
``target_config`` / ``source_config`` lists beside ``target: NAME``. Target config, which the
provider receives as the link's target, wins over source config. The 0.x ``values: {...}`` map is
read as a legacy form. What only Concordance needs (the Python ``source`` folder that ``concordance
deploy`` builds, the runtime ``grants``) sits in a trait of type ``concordance``, which wadm ignores.
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
    answering on ``dispatch_subject``. ``image`` is an OCI reference a host can pull."""

    name: str
    interest: Interest
    path: Path | None = None
    image: str | None = None
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


# read in this order, a later value of a key winning: a host merges a side's named configs in list
# order, and target config, which the provider receives as the link's target, comes last
CONFIG_LISTS = (("source_config",), ("source", "config"), ("target_config",), ("target", "config"))


def _link_values(link: dict[str, Any], component: str) -> dict[str, str]:
    """The link's values, merged in wadm's order: source config, then target config (the
    provider's side, so it wins); or the legacy ``values`` map, never mixed with config."""
    props = link.get("properties") or {}
    legacy = props.get("values")
    if legacy is not None and not isinstance(legacy, dict):
        raise ManifestError(f"component {component!r}: link values must be a mapping, not {legacy!r}")
    values: dict[str, Any] = dict(legacy or {})
    configured = False
    for where in CONFIG_LISTS:
        for entry in _config_list(props, where, component):
            values.update(entry)
            configured = True
    if legacy and configured:
        raise ManifestError(f"component {component!r}: its link gives values both in `values` (the wadm 0.x "
                            f"form) and in link config; give them once, in target.config")
    return {str(k): _link_value(v) for k, v in values.items() if v is not None}


def _config_list(props: dict[str, Any], where: tuple[str, ...], component: str) -> list[dict[str, Any]]:
    """The ``properties`` of each ``{name, properties}`` entry of one wadm config list."""
    node: Any = props
    for key in where:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None:
        return []
    label = ".".join(where)
    if not isinstance(node, list):
        raise ManifestError(f"component {component!r}: link {label} must be a list of {{name, properties}}")
    entries = []
    for index, entry in enumerate(node):
        properties = entry.get("properties") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(properties, (dict, type(None))):
            raise ManifestError(f"component {component!r}: link {label}[{index}] must be {{name, properties: {{...}}}}")
        entries.append(properties or {})
    return entries


def _link_value(value: Any) -> str:
    """YAML may give a process-manager INTEREST as a mapping: it means its JSON."""
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _target_name(link: dict[str, Any]) -> str:
    target = (link.get("properties") or {}).get("target")
    return str(target.get("name", "")) if isinstance(target, dict) else str(target or "")


def is_oci_reference(image: str) -> bool:
    """``oci://...``, or ``registry.host[:port]/repo:tag`` as wasmCloud users write images
    (``localhost:5001/agg:0.1.0`` too); not a URL of another scheme, nor a path to a ``.wasm``."""
    if image.startswith("oci://"):
        return True
    if "://" in image or image.startswith((".", "/")) or image.endswith(".wasm"):
        return False
    registry = image.split("/", 1)[0]
    return ":" in image or "." in registry or registry == "localhost"


def _image_path(image: str, base: Path, component: str) -> Path:
    parsed = urlparse(image)
    if is_oci_reference(image) or parsed.scheme not in ("", "file"):
        raise ManifestError(
            f"component {component!r}: image {image!r} is not a local file; the embedded runtime "
            f"runs file:// images (relative paths are relative to the manifest); `concordance deploy` "
            f"runs OCI images on a wasmCloud host"
        )
    raw = unquote(parsed.netloc + parsed.path) if parsed.scheme else image
    path = Path(raw)
    return path if path.is_absolute() else (base / path).resolve()


def _providers(components: list[dict[str, Any]]) -> set[str]:
    return PROVIDER_NAMES | {str(c.get("name")) for c in components if c.get("type") == "capability"}


def _source_dir(raw: Any, base: Path) -> Path | None:
    if raw is None:
        return None
    path = Path(str(raw))
    return path if path.is_absolute() else (base / path).resolve()  # checked by whoever builds it


def _concordance_settings(raw: dict[str, Any], component: str) -> dict[str, Any]:
    """``source`` and ``grants``: from the component's ``concordance`` trait, or, in the legacy
    form, from its properties (which wadm's schema does not allow)."""
    traits = [t for t in raw.get("traits") or [] if isinstance(t, dict) and t.get("type") == "concordance"]
    if len(traits) > 1:
        raise ManifestError(f"component {component!r} has {len(traits)} concordance traits; give it one")
    settings = (traits[0].get("properties") if traits else None) or {}
    if not isinstance(settings, dict):
        raise ManifestError(f"component {component!r}: the concordance trait's properties must be a mapping")
    unknown = set(settings) - {"source", "grants"}
    if unknown:
        raise ManifestError(f"component {component!r}: the concordance trait takes source and grants, "
                            f"not {', '.join(sorted(unknown))}")
    props = raw.get("properties") or {}
    return {key: settings.get(key, props.get(key)) for key in ("source", "grants")}


def _component_spec(raw: dict[str, Any], providers: set[str], base: Path, in_process: bool) -> ComponentSpec | None:
    name = str(raw.get("name") or "")
    links = [t for t in raw.get("traits") or [] if t.get("type") == "link" and _target_name(t) in providers]
    if not links:
        return None
    if len(links) > 1:
        raise ManifestError(f"component {name!r} has {len(links)} links to Concordance; give it one")
    props = raw.get("properties") or {}
    settings = _concordance_settings(raw, name)
    values = _link_values(links[0], name)
    try:
        interest = parse_interest(values)
        grants = Grants.model_validate(settings["grants"] or {})
    except (LinkError, ValidationError) as exc:
        raise ManifestError(f"component {name!r}: {exc}") from None
    image = str(props["image"]) if props.get("image") else None
    source = _source_dir(settings["source"], base)
    path = oci = None
    if image and is_oci_reference(image) and not in_process:
        oci = image.removeprefix("oci://")
    elif image:
        path = _image_path(image, base, name)
    elif in_process or source is None:
        raise ManifestError(f"component {name!r} has no properties.image" +
                            ("" if in_process else " and no source to build (concordance trait)"))
    return ComponentSpec(name=name, path=path, image=oci, interest=interest, grants=grants, source=source,
                         link_values=values)


def load_manifest(path: Path, need_files: bool = True) -> Manifest:
    """Read and check a manifest; ``need_files`` False when its components are to be built and
    deployed to wasmCloud hosts (from ``source``, or an OCI ``image``) rather than run from their
    files here."""
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
    specs = [s for s in (_component_spec(c, providers, path.parent, need_files) for c in raw_components) if s]
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
