import textwrap
from pathlib import Path

import pytest

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
            target: concordance
            values:
              ROLE: aggregate
              INTEREST: bankaccount
              NAME: bankaccount
              MAX_MESSAGES_PER_BATCH: 50
    - name: proj
      type: component
      properties:
        image: build/proj.wasm
        grants:
          env: {TZ: UTC}
      traits:
        - type: link
          properties:
            target: {name: my-provider}
            source:
              config:
                - name: proj-config
                  properties:
                    role: projector
                    interest: AccountCreated,FundsDeposited
                    name: proj
    - name: unrelated
      type: component
      properties:
        image: ghcr.io/x:1
      traits:
        - type: link
          properties:
            target: httpserver
            values: {ROLE: nonsense}
    - name: my-provider
      type: capability
      properties:
        image: ghcr.io/cosmonic/concordance:0.1.0
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
    assert proj.grants.env == {"TZ": "UTC"}


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
    with pytest.raises(ManifestError, match="is not a local file"):
        load_manifest(write(tmp_path, APP.replace("file://./build/agg.wasm", "ghcr.io/x:1")))


def test_no_linked_component(tmp_path):
    body = APP.replace("target: concordance", "target: other").replace("target: {name: my-provider}", "target: other")
    with pytest.raises(ManifestError, match="links no component to Concordance"):
        load_manifest(write(tmp_path, body))


def test_duplicate_consumer_names(tmp_path):
    body = APP.replace("INTEREST: bankaccount\n              NAME: bankaccount", "INTEREST: bankaccount\n              NAME: proj")
    body = body.replace("role: projector", "role: aggregate").replace("interest: AccountCreated,FundsDeposited", "interest: other")
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, body))
    assert "'agg' and 'proj' both declare AGG_EVT_proj" in str(err.value)


def test_two_links_to_concordance_rejected(tmp_path):
    body = APP.replace(
        "      traits:\n        - type: link\n          properties:\n            target: concordance\n",
        "      traits:\n        - type: link\n          properties: {target: concordance}\n"
        "        - type: link\n          properties:\n            target: concordance\n",
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
