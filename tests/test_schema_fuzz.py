"""A bounded schemathesis run over the server's own OpenAPI document: every operation, valid and
invalid input, no 5xx, and every response (status, content type, headers, body) as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("schemathesis.toml")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def test_openapi_fuzz_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    st = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(st),
        "--config-file",
        str(CONFIG),
        "run",
        f"{server}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        os.environ.get("CLEARSKY_FUZZ_EXAMPLES", "20"),  # per operation and phase
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--report",
        "json",
        "--report-dir",
        str(tmp_path),
    ]
    # in tmp_path: schemathesis keeps a cache folder in its working directory
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("json-*.json")).read_text())
    assert report["failures"] == [] and report["errors"] == []
    assert report["operations"]["tested"] == report["operations"]["total"] >= 10
    cases = report["test_cases"]
    assert cases["generated"] > 500 and cases["with_failures"] == 0, cases
    print(
        f"schemathesis: {cases['generated']} cases over {report['operations']['total']} operations"
    )
