"""Reading broker.yaml: the amqtt config as a plain dict, and the OTA plugin's settings in it."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otacore.errors import ConfigError, ConfigIssue
from otacore.config.settings import PLUGIN_PATH, Settings, settings_from_mapping
from otacore.config.yamlmarks import MarkedMap, YamlSyntaxError, load_marked


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class BrokerConfigFile:
    path: Path
    document: MarkedMap

    def broker_dict(self) -> dict[str, Any]:
        """A plain, mutable copy for amqtt, with `plugins` as a mapping."""
        broker = _plain(copy.deepcopy(self.document))
        plugins = broker.get("plugins")
        if isinstance(plugins, list):
            merged: dict[str, Any] = {}
            for entry in plugins:
                merged.update({entry: {}} if isinstance(entry, str) else entry)
            broker["plugins"] = merged
        return broker

    @staticmethod
    def plugin_options(broker: dict[str, Any]) -> dict[str, Any]:
        """The OTA plugin's option mapping inside `broker` (the same object, to edit in place)."""
        plugins = broker["plugins"]
        if plugins.get(PLUGIN_PATH) is None:
            plugins[PLUGIN_PATH] = {}
        return plugins[PLUGIN_PATH]

    def settings(self, broker: dict[str, Any]) -> Settings:
        options = {k: v for k, v in self.plugin_options(broker).items() if k != "base_dir"}
        plugins = self.document.get("plugins")
        lines = plugins.get(PLUGIN_PATH) if isinstance(plugins, MarkedMap) else None
        return settings_from_mapping(options, self.path, lines if isinstance(lines, MarkedMap) else None)


def read_broker_config(path: Path) -> BrokerConfigFile:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError([ConfigIssue(path, 0, "", "broker config not found; pass --config PATH")])
    try:
        document = load_marked(path)
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigIssue(path, exc.line, "", exc.problem)]) from None
    if not isinstance(document, MarkedMap):
        raise ConfigError([ConfigIssue(path, 1, "", "must be a mapping with listeners: and plugins:")])
    plugins = document.get("plugins")
    names = list(plugins) if isinstance(plugins, dict) else \
        [next(iter(p)) if isinstance(p, dict) else p for p in plugins] if isinstance(plugins, list) else []
    if PLUGIN_PATH not in names:
        raise ConfigError([ConfigIssue(path, document.line_of("plugins"), "plugins",
                                       f"{PLUGIN_PATH} is missing; add it (see config/broker.yaml in the repo)")])
    return BrokerConfigFile(path, document)


def load_settings(config_path: Path, *, catalog: str | None = None, data_dir: str | None = None) -> Settings:
    """Settings as `ota-server --config` would see them, with otactl's path overrides."""
    config = read_broker_config(config_path)
    broker = config.broker_dict()
    options = config.plugin_options(broker)
    if catalog:
        options["catalog"] = str(Path(catalog).resolve())
    if data_dir:
        options["data_dir"] = str(Path(data_dir).resolve())
    return config.settings(broker)
