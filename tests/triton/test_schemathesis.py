"""schemathesis against the Open Inference Protocol's REST OpenAPI file
(../shared/specs/oip/open_inference_rest.yaml), bounded: no answer may be
a 5xx, and every answer must match the schema."""
import os
import subprocess

import pytest

from conftest import ROOT

SPEC = os.path.join(ROOT, "..", "shared", "specs", "oip", "open_inference_rest.yaml")
ST = os.path.join(ROOT, ".deps", "pyenv", "bin", "schemathesis")


def test_oip_rest_schema(server, tmp_path):
    if not os.path.exists(SPEC):
        pytest.skip(f"{SPEC} missing (../shared/specs)")
    # The file writes its path parameters as ${MODEL_NAME}; OpenAPI's
    # template is {MODEL_NAME}, which is what the protocol means.
    spec = tmp_path / "oip.yaml"
    spec.write_text(open(SPEC).read().replace("${", "{"))
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text('[parameters]\n"path.MODEL_NAME" = "mobilenetv3_large"\n"path.MODEL_VERSION" = "1"\n')
    out = subprocess.run(
        [ST, "--config-file", str(cfg), "run", str(spec), "--url", "http://" + server["rest"],
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
         "--max-examples", os.environ.get("ST_MAX_EXAMPLES", "40")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    print(out.stdout[-2500:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
