"""`pmod_serve.envs` is the one place PMOD_* settings are read, and reads them when accessed."""

from __future__ import annotations

import re
from pathlib import Path

from pmod_serve import envs

REPO = Path(__file__).resolve().parents[1]
# Everything but the test suite (whose own knobs, PMOD_TEST_CACHE and PMOD_SOAK_SECONDS, are not
# pmod-serve settings).
PACKAGES = ("pmod_serve", "pmod_reference", "model_registry", "pmod_train", "loadtests", "benchmarks")


def test_no_module_reads_a_pmod_variable_on_its_own():
    read = re.compile(r"""(os\.environ\.get|os\.getenv)\(\s*["']PMOD_|os\.environ\[["']PMOD_[A-Z_]+["']\](?!\s*=)""")
    paths = sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))
    assert REPO / "pmod_serve" / "envs.py" in paths and len(paths) > 50
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in paths
        if path != REPO / "pmod_serve" / "envs.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if read.search(line)
    ]
    assert not offenders


def test_values_are_read_when_accessed(monkeypatch):
    monkeypatch.setenv("PMOD_MEDIA_MAX_BYTES", "1234")
    monkeypatch.setenv("PMOD_MEDIA_ALLOW_HOSTS", " 10.0.0.0/8, example.internal ,")
    monkeypatch.delenv("PMOD_MAX_BODY_BYTES", raising=False)
    monkeypatch.setenv("PMOD_MODEL_VOCAB_SIZE", "not a number")
    assert envs.PMOD_MEDIA_MAX_BYTES == 1234
    assert envs.PMOD_MEDIA_ALLOW_HOSTS == ["10.0.0.0/8", "example.internal"]
    assert envs.PMOD_MAX_BODY_BYTES == envs.DEFAULT_MAX_BODY_BYTES
    assert envs.PMOD_MODEL_VOCAB_SIZE is None
    monkeypatch.setenv("PMOD_MODEL_VOCAB_SIZE", "32000")
    assert envs.PMOD_MODEL_VOCAB_SIZE == 32000
    assert set(dir(envs)) == set(envs.environment_variables)
