"""Hypothesis settings for the fuzz suite, one profile per use, chosen by HYPOTHESIS_PROFILE.

* ``ci`` (default): deterministic examples (derandomized, no example database written), sized so
  the whole fuzz suite takes about a minute on a 2-core machine; runs in `make test` / `.ci/run`.
* ``nightly``: random examples, 50x as many, the example database kept: a long search for
  ``HYPOTHESIS_PROFILE=nightly python -m pytest test/test_fuzz_properties.py``.
* ``dev``: a quick smoke run while editing.

`examples(n)` scales a test's example count (its share of the suite's budget) by the profile.
"""
from __future__ import annotations

import atexit
import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_SCALE = {"ci": 1.0, "nightly": 50.0, "dev": 0.2}
if PROFILE not in _SCALE:
    raise ValueError(f"HYPOTHESIS_PROFILE must be one of {sorted(_SCALE)}, got {PROFILE!r}")

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("nightly", print_blob=True, **_COMMON)
settings.register_profile("dev", derandomize=True, database=None, **_COMMON)
settings.load_profile(PROFILE)


def examples(n: int) -> settings:
    """Settings for a test that runs `n` examples under the ci profile."""
    return settings(max_examples=max(1, int(n * _SCALE[PROFILE])))


class Tally:
    """What the fuzz tests tried, per input class: inputs, survived (answered: accepted or refused
    with the typed error), commands beyond limits, and measurements. With FUZZ_FIGURES=path set,
    the figures are written there as JSON when the test session ends (see the README's fuzz section)."""

    def __init__(self):
        self.classes: dict[str, dict] = {}
        self.measurements: dict[str, object] = {}

    def record(self, name: str, *, survived: bool = True, accepted: bool | None = None, beyond_limits: int = 0,
               count: int = 1) -> None:
        entry = self.classes.setdefault(name, {"inputs": 0, "survived": 0, "accepted": 0, "refused": 0,
                                               "commands_beyond_limits": 0})
        entry["inputs"] += count
        entry["survived"] += count if survived else 0
        if accepted is not None:
            entry["accepted" if accepted else "refused"] += count
        entry["commands_beyond_limits"] += beyond_limits

    def measure(self, name: str, value) -> None:
        self.measurements[name] = value

    def dump(self) -> None:
        path = os.environ.get("FUZZ_FIGURES")
        if not path or not (self.classes or self.measurements):
            return
        import json
        from pathlib import Path

        target = Path(path)
        figures = json.loads(target.read_text()) if target.exists() else {"classes": {}, "measurements": {}}
        for name, entry in self.classes.items():
            figures["classes"][name] = entry
        figures["measurements"].update(self.measurements)
        figures["profile"] = PROFILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


TALLY = Tally()
atexit.register(TALLY.dump)
