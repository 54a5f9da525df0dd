"""The template unit (hot standby pair, sandboxd@.service) is the unit: no lab needed."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_INSTANCE = {"Description", "SyslogIdentifier"}  # the only settings allowed to differ


def settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting, in order; comments and blank lines left out."""
    found, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if re.fullmatch(r"\[\w+\]", line):
            section = line
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def test_the_template_unit_has_every_setting_of_the_unit():
    unit = settings(ROOT / "systemd" / "sandboxd.service")
    template = settings(ROOT / "systemd" / "sandboxd@.service")
    assert [s[:2] for s in unit] == [s[:2] for s in template]  # same settings, same order
    differing = {
        key for (_, key, value), (_, _, other) in zip(unit, template, strict=True) if value != other
    }
    assert differing == PER_INSTANCE
    # Nothing else names the instance: ExecStart= reads the same config for every instance
    # (same node, same workspace: a standby), StateDirectory= is shared.
    assert all(("%i" in value) == (key in PER_INSTANCE) for _, key, value in template)
