"""YAML loading that remembers the line of every key and list item, for error messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class MarkedMap(dict):
    """A mapping that knows its own line and the line of each of its keys (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class MarkedList(list):
    """A list that knows its own line and the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


MAX_DEPTH = 100  # nesting of lists and mappings; deeper would exhaust Python's recursion
_MAX_INT_BITS = 14_000  # about 4,200 digits: within Python's 4,300-digit limit on int <-> str


class _MarkingLoader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"lists and mappings nest more than {MAX_DEPTH} deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        # PyYAML lets a plain ValueError out for a scalar it matched but cannot build (a time
        # like 2026-02-30, an int of over 4300 digits): give it the node's line like any error.
        try:
            value = super().construct_object(node, deep)
            # A hex or octal int escapes that limit, and then str() or json.dumps() of it fails.
            if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
                raise ValueError("too many digits")
            return value
        except (ValueError, OverflowError) as exc:
            text = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
            shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"
            reason = "too many digits" if "digits" in str(exc) else str(exc)
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {shown} ({reason})",
                                                    node.start_mark) from None


def _construct_map(loader: _MarkingLoader, node: yaml.MappingNode) -> MarkedMap:
    loader.flatten_mapping(node)
    result = MarkedMap()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_list(loader: _MarkingLoader, node: yaml.SequenceNode) -> MarkedList:
    result = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_MarkingLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_MarkingLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_list)


class YamlSyntaxError(ValueError):
    """The file is not valid YAML; `line` is 1-based, 0 when unknown."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


# YAML files this server reads (broker.yaml, the catalog): parsing 40 MiB took 13 s.
MAX_FILE_BYTES = 32 * 2**20

def load_marked(path: Path) -> Any:
    """Parse a YAML file safely into MarkedMap / MarkedList / scalars."""
    with path.open("rb") as file:
        raw = file.read(MAX_FILE_BYTES + 1)  # a stat() could lie (a FIFO, /proc): read at most this much
    if len(raw) > MAX_FILE_BYTES:
        raise YamlSyntaxError(path, 0, f"the file is over {MAX_FILE_BYTES // 2**20} MiB; a catalog of 100,000 listed "
                                       "devices takes about 10 MiB: remove what is not needed")
    text = raw.decode("utf-8")
    try:
        return yaml.load(text, Loader=_MarkingLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problem = exc.problem or str(exc)
        raise YamlSyntaxError(path, line, f"invalid YAML: {problem}; fix the YAML syntax") from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(path, 0, f"invalid YAML: {exc}; fix the YAML syntax") from None
    except RecursionError:  # MAX_DEPTH should prevent it; a line-less error beats a traceback
        raise YamlSyntaxError(path, 0, "invalid YAML: nested too deeply; flatten the lists and mappings") from None
