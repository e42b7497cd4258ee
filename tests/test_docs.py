"""docs/configuration.md cannot drift from the configuration models in bridge/config/.

Every setting, found by walking the pydantic models from ``Config``, must appear in the
reference as its dotted path in backticks (`listen.timeouts.acse`,
`destinations.<name>.batch.max_instances`, `rules[].when.calling_ae`). In the other
direction, every path named in the first column of a reference table must be a real
setting. Add a field and this test fails until the docs describe it. The complete
example at the end of the page must validate.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import forkserver
import pydicom
import yaml
from peers import storescu
from pydantic import BaseModel
from pydicom import uid

from bridge.config import ArchiveDestination, Config, FolderDestination, validate

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _members(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, with Annotated and Optional stripped."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [m for a in typing.get_args(annotation) if a is not type(None) for m in _members(a)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _children(annotation: Any, prefix: str) -> list[tuple[str, type[BaseModel]]]:
    """The models a value of ``annotation`` at ``prefix`` may hold, with their paths."""
    found = []
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if _is_model(member):
            found.append((prefix, member))
        elif origin is dict:
            found += _children(typing.get_args(member)[1], f"{prefix}.<name>")
        elif origin is list:
            found += _children(typing.get_args(member)[0], f"{prefix}[]")
    return found


def setting_paths(model: type[BaseModel] = Config, prefix: str = "",
                  seen: dict[type[BaseModel], str] | None = None) -> set[str]:
    """Every dotted path of a setting, from ``model`` down. A model met again at another
    path (a tag condition's ``not``, a condition in a list) is not walked again: its
    settings are documented once, where the walk first meets them."""
    seen = {} if seen is None else seen
    seen.setdefault(model, prefix)
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}.{key}" if prefix else key
        paths.add(path)
        for child_prefix, child in _children(field.annotation, path):
            if child_prefix.endswith(".<name>"):
                paths.add(child_prefix)  # a map's entry: `destinations.<name>`
            if seen.get(child, child_prefix) == child_prefix:
                paths |= setting_paths(child, child_prefix, seen)
    return paths


def documented_paths() -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", DOC.read_text(encoding="utf-8")))


def table_paths() -> set[str]:
    """Paths named in the first column of the reference tables."""
    return set(re.findall(r"^\|\s*`([^`\n]+)`\s*\|", DOC.read_text(encoding="utf-8"), re.MULTILINE))


def test_the_walk_finds_nested_models_maps_lists_and_union_members() -> None:
    paths = setting_paths()
    assert {
        "listen.timeouts.acse",
        "nodes.<name>.timeouts.dimse",
        "destinations.<name>.batch.max_instances",
        "destinations.<name>.retry.max_age",
        "destinations.<name>.filename",  # FolderDestination only
        "rules[].when.calling_ae",
        "rules[].continue",  # by its alias
    } <= paths
    # both members of the destination union are walked
    for member in (FolderDestination, ArchiveDestination):
        fields = member.model_fields.items()
        assert {f"destinations.<name>.{field.alias or name}" for name, field in fields} <= paths


def test_every_setting_is_documented() -> None:
    missing = sorted(setting_paths() - documented_paths())
    assert not missing, f"docs/configuration.md does not describe: {', '.join(missing)}"


def test_every_documented_setting_exists() -> None:
    unknown = sorted(table_paths() - setting_paths())
    assert not unknown, f"docs/configuration.md names unknown settings: {', '.join(unknown)}"


def test_the_complete_example_validates(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8").split("## Complete example", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert block, "docs/configuration.md: no yaml block under '## Complete example'"
    raw = yaml.safe_load(block.group(1))
    config = validate(raw, base=tmp_path, source="docs/configuration.md")
    # it is meant to show every setting: each top-level key is there, but for the
    # deprecated alias of http (metrics), which would be an error beside it
    assert set(raw) == {field.alias or name for name, field in Config.model_fields.items()} - {"metrics"}
    assert config.destinations


RULES_DOC = DOC.parent / "rules.md"


def test_every_example_in_the_rules_guide_validates() -> None:
    from bridge.config import Rule

    blocks = re.findall(r"```yaml\n(.*?)```", RULES_DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert blocks
    for block in blocks:
        raw = yaml.safe_load(block)
        rules = raw if isinstance(raw, list) else [{"name": "example", "store": ["a"], **raw}]
        for rule in rules:
            Rule.model_validate(rule)


def test_the_rules_guide_names_every_operator() -> None:
    from bridge.config import TagMatch

    documented = set(re.findall(r"`([^`\n]+)`", RULES_DOC.read_text(encoding="utf-8")))
    operators = {field.alias or name for name, field in TagMatch.model_fields.items()}
    assert operators <= documented, f"docs/rules.md does not name: {sorted(operators - documented)}"


def test_every_check_sample_prints_what_check_prints(tmp_path: Path) -> None:
    """Each ``$ dicom-bridge check --config config.yaml`` sample in the docs is run on the
    yaml block just before it, and must print exactly what the sample shows."""
    samples = 0
    for doc in sorted(DOC.parent.glob("*.md")):
        blocks = re.findall(r"```(\w*)\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL)
        for (kind, before), (_, block) in zip(blocks, blocks[1:], strict=False):
            command, _, expected = block.partition("\n")
            if not command.startswith("$ dicom-bridge check"):
                continue
            assert kind == "yaml" and command == "$ dicom-bridge check --config config.yaml", \
                f"{doc.name}: a check sample must follow the yaml block it checks: {command}"
            (tmp_path / "config.yaml").write_text(before, encoding="utf-8")
            result = forkserver.run(["check", "--config", "config.yaml"], cwd=tmp_path, timeout=60,
                                    env={**os.environ, "PYTHONPATH": str(DOC.parent.parent)})
            assert result.stdout + result.stderr == expected, f"{doc.name}: {command}"
            samples += 1
    assert samples >= 2


README = DOC.parent.parent / "README.md"
STORESCU_OPTIONS = ("-xs", "-xy", "-xx", "-xv", "-xw", "-xt", "-xu", "-xr")  # one per compressed syntax


def test_the_readme_says_how_storescu_sends_compressed_files(corpus, bridge_factory) -> None:
    """Each option the README gives for a compressed syntax sends a file of that syntax,
    which plain ``storescu`` does not send."""
    text = README.read_text(encoding="utf-8")
    table = re.findall(r"^\| [^|]+ \| ([\d.]+) \| `(-x\w)` \|$", text, re.MULTILINE)
    rows = {option: number for number, option in table}
    assert sorted(rows) == sorted(STORESCU_OPTIONS)
    files = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID: p for p in corpus}
    bridge = bridge_factory({"destinations": {"archive": {"type": "archive"}},
                             "rules": [{"name": "all", "store": ["archive"]}]})
    for option, syntax in rows.items():
        file = files[uid.UID(syntax)]
        assert storescu(bridge.port, [file]).statuses == [], f"plain storescu sent {syntax}"
        sent = storescu(bridge.port, [file], extra=[option])
        assert sent.statuses == [0x0000], f"{option} {syntax}:\n{sent.output}"
