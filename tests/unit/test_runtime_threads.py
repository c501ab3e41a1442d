"""The model stages' OpenMP wait policy: set before their libraries load, unless the
deployment chose one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = (
    "from voicejury_runtime.threads import prefer_passive_waits; "
    "import sys; print(prefer_passive_waits(), 'torch' in sys.modules)"
)


@pytest.mark.parametrize(("given", "in_force"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_passive_waits_unless_the_deployment_chose(given: str | None, in_force: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    # and importing the runtime has not loaded torch (libgomp) before the policy is set
    assert out.stdout.split() == [in_force, "False"]


@pytest.mark.parametrize("stage", ["separator", "pitch", "asr"])
def test_model_stages_set_the_policy_before_importing_their_app(stage: str) -> None:
    main = (REPO / "services" / stage / "src" / f"voicejury_{stage}" / "__main__.py").read_text()
    assert main.index("prefer_passive_waits()") < main.index("from .app import")
