import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from concordance_provider.links import Role
from concordance_provider.manifest import ManifestError, load_manifest


def write(tmp_path: Path, body: str, wasm: tuple[str, ...] = ("build/agg.wasm", "build/proj.wasm")) -> Path:
    for rel in wasm:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\0asm")
    path = tmp_path / "app.yaml"
    path.write_text(textwrap.dedent(body))
    return path


APP = """\
apiVersion: core.oam.dev/v1beta1
kind: Application
metadata:
  name: bank
spec:
  components:
    - name: agg
      type: component
      properties:
        image: file://./build/agg.wasm
      traits:
        - type: link
          properties:
            namespace: concordance
            package: eventsourcing
            interfaces: [aggregate]
            target:
              name: concordance
              config:
                - name: agg-link
                  properties:
                    ROLE: aggregate
                    INTEREST: bankaccount
                    NAME: bankaccount
                    MAX_MESSAGES_PER_BATCH: "50"
    - name: proj
      type: component
      properties:
        image: build/proj.wasm
      traits:
        - type: link
          properties:
            namespace: concordance
            package: eventsourcing
            interfaces: [stateless-handler]
            target: my-provider
            target_config:
              - name: proj-config
                properties:
                  role: projector
                  interest: AccountCreated,FundsDeposited
                  name: proj
        - type: concordance
          properties:
            source: ./projector
            grants:
              env: {TZ: UTC}
    - name: unrelated
      type: component
      properties:
        image: ghcr.io/x:1
      traits:
        - type: link
          properties:
            namespace: wasi
            package: http
            interfaces: [incoming-handler]
            target: {name: httpserver, config: [{name: nonsense, properties: {ROLE: nonsense}}]}
    - name: my-provider
      type: capability
      properties:
        image: ghcr.io/cosmonic/concordance:0.1.0
"""

LEGACY = """\
apiVersion: core.oam.dev/v1beta1
kind: Application
metadata: {name: legacy}
spec:
  components:
    - name: agg
      type: component
      properties:
        image: file://./build/agg.wasm
        source: ./aggregate
        grants: {env: {TZ: UTC}}
      traits:
        - type: link
          properties:
            target: concordance
            values: {ROLE: aggregate, INTEREST: bankaccount, NAME: bankaccount, MAX_MESSAGES_PER_BATCH: 50}
"""


def test_load_manifest_both_link_shapes(tmp_path):
    manifest = load_manifest(write(tmp_path, APP))
    assert manifest.name == "bank"
    assert [c.name for c in manifest.components] == ["agg", "proj"]
    agg, proj = manifest.components
    assert agg.interest.role is Role.AGGREGATE and agg.interest.stream == "bankaccount"
    assert agg.interest.max_messages_per_batch == 50
    assert agg.path == (tmp_path / "build/agg.wasm").resolve()
    assert proj.interest.role is Role.PROJECTOR
    assert proj.interest.event_types == ("account_created", "funds_deposited")
    assert proj.path == (tmp_path / "build/proj.wasm").resolve()
    assert proj.grants.env == {"TZ": "UTC"} and proj.source == (tmp_path / "projector").resolve()
    assert agg.link_values == {"ROLE": "aggregate", "INTEREST": "bankaccount", "NAME": "bankaccount",
                               "MAX_MESSAGES_PER_BATCH": "50"}


def test_legacy_values_map_and_properties_still_read(tmp_path):
    agg, = load_manifest(write(tmp_path, LEGACY)).components
    assert agg.interest.stream == "bankaccount" and agg.interest.max_messages_per_batch == 50
    assert agg.source == (tmp_path / "aggregate").resolve() and agg.grants.env == {"TZ": "UTC"}


def test_target_config_wins_over_source_config(tmp_path):
    body = APP.replace("            target:\n              name: concordance\n",
                       "            source: {config: [{name: s, properties: {NAME: from_source, KEY: accountNumber}}]}\n"
                       "            target:\n              name: concordance\n")
    agg = load_manifest(write(tmp_path, body)).components[0]
    assert agg.interest.name == "bankaccount"  # the target's NAME
    assert agg.link_values["KEY"] == "accountNumber"  # what only the source config gives is kept


def test_source_config_alone_is_read(tmp_path):
    body = APP.replace("target_config:", "source_config:")
    assert load_manifest(write(tmp_path, body)).components[1].interest.name == "proj"


def test_later_config_entry_wins(tmp_path):
    body = APP.replace("                    MAX_MESSAGES_PER_BATCH: \"50\"\n",
                       "                    MAX_MESSAGES_PER_BATCH: \"50\"\n"
                       "                - name: agg-tuning\n                  properties: {MAX_MESSAGES_PER_BATCH: \"7\"}\n")
    assert load_manifest(write(tmp_path, body)).components[0].interest.max_messages_per_batch == 7


def test_values_mixed_with_config_is_refused(tmp_path):
    body = APP.replace("            target:\n              name: concordance\n",
                       "            values: {KEY: accountNumber}\n            target:\n              name: concordance\n")
    with pytest.raises(ManifestError, match="component 'agg': its link gives values both in `values`"):
        load_manifest(write(tmp_path, body))


@pytest.mark.parametrize("config, where", [
    ("config: {ROLE: aggregate}", "target.config must be a list"),
    ("config: [ROLE]", r"target.config\[0\] must be \{name, properties"),
    ("config: [{name: x, properties: [ROLE]}]", r"target.config\[0\] must be \{name, properties"),
])
def test_malformed_link_config_is_named(tmp_path, config, where):
    body = APP.replace("            target:\n              name: concordance\n              config:\n",
                       f"            target:\n              name: concordance\n              {config}\n              old:\n")
    with pytest.raises(ManifestError, match=f"component 'agg': link {where}"):
        load_manifest(write(tmp_path, body))


def test_unknown_setting_in_concordance_trait_is_named(tmp_path):
    with pytest.raises(ManifestError, match="concordance trait takes source and grants, not sources"):
        load_manifest(write(tmp_path, APP.replace("source: ./projector", "sources: ./projector")))


def test_for_deploy_source_alone_is_enough(tmp_path):
    body = APP.replace("        image: build/proj.wasm\n", "        id: proj\n")
    proj = load_manifest(write(tmp_path, body), need_files=False).components[1]
    assert proj.path is None and proj.image is None and proj.source == (tmp_path / "projector").resolve()
    with pytest.raises(ManifestError, match="'proj' has no properties.image"):
        load_manifest(write(tmp_path, body))  # to run in-process, a file is needed


def test_for_deploy_an_oci_image_is_kept(tmp_path):
    body = APP.replace("file://./build/agg.wasm", "oci://127.0.0.1:5001/bank/agg:0.1.0")
    agg = load_manifest(write(tmp_path, body), need_files=False).components[0]
    assert agg.image == "127.0.0.1:5001/bank/agg:0.1.0" and agg.path is None
    for image in ("ghcr.io/bank/agg:0.1.0", "localhost:5001/agg:0.1.0", "localhost/agg"):
        body = APP.replace("file://./build/agg.wasm", image)
        assert load_manifest(write(tmp_path, body), need_files=False).components[0].image == image
    body = APP.replace("file://./build/agg.wasm", "https://example.org/agg.wasm")
    with pytest.raises(ManifestError, match="'https://example.org/agg.wasm' is not a local file"):
        load_manifest(write(tmp_path, body), need_files=False)


def test_for_deploy_a_component_with_neither_image_nor_source_is_named(tmp_path):
    body = APP.replace("        image: file://./build/agg.wasm\n", "        id: agg\n")
    with pytest.raises(ManifestError, match="'agg' has no properties.image and no source to build"):
        load_manifest(write(tmp_path, body), need_files=False)


def test_target_string_and_default_name(tmp_path):
    body = APP.replace("  name: bank\n", "  labels: {}\n", 1)
    assert load_manifest(write(tmp_path, body)).name == "app"


def test_absolute_file_url(tmp_path):
    wasm = tmp_path / "abs" / "agg.wasm"
    body = APP.replace("file://./build/agg.wasm", f"file://{wasm}")
    manifest = load_manifest(write(tmp_path, body, ("abs/agg.wasm", "build/proj.wasm")))
    assert manifest.components[0].path == wasm


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")


def test_bad_yaml(tmp_path):
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(write(tmp_path, "kind: [Application\n"))


@pytest.mark.parametrize("body", ["kind: Deployment\nspec: {}\n", "- kind: Application\n", ""])
def test_not_an_application(tmp_path, body):
    with pytest.raises(ManifestError, match="kind: Application"):
        load_manifest(write(tmp_path, body))


def test_no_components(tmp_path):
    with pytest.raises(ManifestError, match="no spec.components"):
        load_manifest(write(tmp_path, "kind: Application\nspec: {components: []}\n"))


def test_unknown_role_names_component(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, APP.replace("ROLE: aggregate", "ROLE: saga")))
    assert "component 'agg'" in str(err.value) and "'saga'" in str(err.value)


def test_missing_component_file(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, APP, wasm=("build/agg.wasm",)))
    assert "not found" in str(err.value) and "proj" in str(err.value) and "proj.wasm" in str(err.value)


def test_non_file_image_scheme(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, APP.replace("file://./build/agg.wasm", "oci://ghcr.io/x:1")))
    assert "'oci://ghcr.io/x:1' is not a local file" in str(err.value)


def test_registry_image_without_scheme_rejected(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, APP.replace("file://./build/agg.wasm", "ghcr.io/x:1")))
    assert "ghcr.io/x:1" in str(err.value)


def test_registry_image_without_scheme_says_not_local(tmp_path):
    with pytest.raises(ManifestError, match="is not a local file.*`concordance deploy` runs OCI images"):
        load_manifest(write(tmp_path, APP.replace("file://./build/agg.wasm", "ghcr.io/x:1")))


def test_no_linked_component(tmp_path):
    body = APP.replace("name: concordance\n", "name: other\n").replace("target: my-provider", "target: other")
    with pytest.raises(ManifestError, match="links no component to Concordance"):
        load_manifest(write(tmp_path, body))


def test_duplicate_consumer_names(tmp_path):
    body = APP.replace("INTEREST: bankaccount\n                    NAME: bankaccount", "INTEREST: bankaccount\n                    NAME: proj")
    body = body.replace("role: projector", "role: aggregate").replace("interest: AccountCreated,FundsDeposited", "interest: other")
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, body))
    assert "'agg' and 'proj' both declare AGG_EVT_proj" in str(err.value)


def test_two_links_to_concordance_rejected(tmp_path):
    body = APP.replace(
        "      traits:\n        - type: link\n          properties:\n            namespace: concordance\n",
        "      traits:\n        - type: link\n          properties: {target: concordance}\n"
        "        - type: link\n          properties:\n            namespace: concordance\n",
        1,
    )
    with pytest.raises(ManifestError, match="component 'agg' has 2 links"):
        load_manifest(write(tmp_path, body))


def test_missing_image(tmp_path):
    with pytest.raises(ManifestError, match="'agg' has no properties.image"):
        load_manifest(write(tmp_path, APP.replace("        image: file://./build/agg.wasm\n", "        other: 1\n")))


def test_unknown_grant_rejected(tmp_path):
    with pytest.raises(ManifestError, match="component 'proj'"):
        load_manifest(write(tmp_path, APP.replace("env: {TZ: UTC}", "net: {all: yes}")))


def test_empty_yaml_value_is_missing_not_the_string_none(tmp_path):
    # `NAME:` with no value is YAML null; it must not become a component named "None".
    with pytest.raises(ManifestError, match="NAME"):
        load_manifest(write(tmp_path, APP.replace("NAME: bankaccount", "NAME:")))


ROOT = Path(__file__).resolve().parents[2]
WADM_SCHEMAS = ROOT / "tests" / "data" / "wadm"  # wadm's published schemas; see the README there


def _schema(version: str) -> dict:
    return json.loads((WADM_SCHEMAS / f"oam.schema.{version}.json").read_text())


def _example_manifests() -> list[Path]:
    found = [p for p in sorted((ROOT / "examples").rglob("*.y*ml"))
             if "build" not in p.parts and (yaml.safe_load(p.read_text()) or {}).get("kind") == "Application"]
    assert found, "no example manifest found"
    return found


def _link_errors(schema: dict, doc: dict) -> list[str]:
    """wadm's schema lets any trait through (custom traits); its LinkProperty, checked on each
    link trait, refuses what wadm would not read as a link (the 0.x `values`, a string target)."""
    link = jsonschema.Draft7Validator({**schema["definitions"]["LinkProperty"], "definitions": schema["definitions"]})
    return [f"{c['name']}: {e.message}" for c in doc["spec"]["components"] for t in c.get("traits") or []
            if t["type"] == "link" for e in link.iter_errors(t["properties"])]


@pytest.mark.parametrize("path", _example_manifests(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_manifest_is_valid_for_wadm(path):
    schema, doc = _schema("v0.21.1"), yaml.safe_load(path.read_text())
    assert [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)] == []
    assert _link_errors(schema, doc) == []
    assert load_manifest(path, need_files=False).components


def test_the_legacy_form_is_not_valid_for_wadm(tmp_path):
    errors = _link_errors(_schema("v0.21.1"), yaml.safe_load(LEGACY))
    assert any("'values' was unexpected" in e for e in errors) and any("is not of type 'object'" in e for e in errors)


def _as_config_lists(doc: dict) -> dict:
    """The same application in the earlier wadm spelling: ``target: NAME`` and ``target_config``."""
    for component in doc["spec"]["components"]:
        component["traits"] = [t for t in component.get("traits") or [] if t["type"] != "concordance"]
        for link in (t["properties"] for t in component["traits"] if t["type"] == "link"):
            target = link.pop("target")
            link["target"], link["target_config"] = target["name"], target.get("config", [])
    return doc


@pytest.mark.parametrize("path", _example_manifests(), ids=lambda p: str(p.relative_to(ROOT)))
def test_both_wadm_spellings_of_an_example_give_the_same_links(tmp_path, path):
    doc = _as_config_lists(yaml.safe_load(path.read_text()))
    assert [e.message for e in jsonschema.Draft7Validator(_schema("v0.12.2")).iter_errors(doc)] == []
    (tmp_path / "lists.yaml").write_text(yaml.safe_dump(doc))
    lists = load_manifest(tmp_path / "lists.yaml", need_files=False).components
    written = load_manifest(path, need_files=False).components
    assert [(c.name, c.link_values, c.interest) for c in lists] == [(c.name, c.link_values, c.interest) for c in written]
