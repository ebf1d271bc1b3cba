"""Config files and ``--set`` overrides: raw mappings, before the schema sees them.

:func:`read_config_file` parses a YAML, TOML or JSON mapping (UTF-8; a key given twice in one
mapping, an empty file and a key that is not a name are errors); :func:`apply_overrides` applies
``key=value`` overrides and remembers which argument set each key, so that an error names it.
Every problem raises :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "apply_overrides", "parse_override", "read_config_file"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and its source."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON (``.json``) mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the path of a .yaml, "
                          ".toml or .json file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .toml or "
                          ".json")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the "
                          "config as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        data = _parse(text, suffix, path)
    except ConfigError:
        raise
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}; remove one of them") from None
    except Exception as err:  # parser errors: yaml.YAMLError, tomllib.TOMLDecodeError, ...
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    if data is None:  # an empty (truncated, unsaved) file must not train on every default
        raise ConfigError(f"{path}: the file is empty (no keys); a config needs at least one "
                          "key, e.g. `dataset: fashion_mnist` (write `{}` to mean every default)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got "
                          f"{type(data).__name__}")
    check_key_names(data, str(path))
    return data


def _parse(text: str, suffix: str, path: Path) -> Any:
    if suffix in (".yaml", ".yml"):
        return _load_yaml(text)
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_unique_pairs)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError(f"{path}: TOML configs need Python 3.11+ or the package tomli "
                              "(pip install tomli)") from None
    return tomllib.loads(text)  # TOML itself forbids duplicate keys


def check_key_names(data: Mapping[Any, Any], label: str, prefix: str = "") -> None:
    """Every key of a config mapping (at any depth) is a string: YAML reads ``1: 2`` or
    ``true: x`` as a number or boolean key, which no config key is."""
    for k, v in data.items():
        if not isinstance(k, str):
            raise ConfigError(f"{label}: key {prefix}{k!r} ({type(k).__name__}) is not a key "
                              "name; config keys are names such as 'lr' (check the line, or "
                              "quote the key)")
        if isinstance(v, Mapping):
            check_key_names(v, label, f"{prefix}{k}.")


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {k!r} appears twice")
        out[k] = v
    return out


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _value in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} appears twice (line "
                                        f"{seen[key].start_mark.line + 1} and line "
                                        f"{key_node.start_mark.line + 1})")
                seen[key] = key_node
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed value)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        import yaml

        parsed = yaml.safe_load(value) if value.strip() else ""
    except Exception:
        parsed = value
    return key, parsed


def apply_overrides(
    raw: dict[str, Any], overrides: Iterable[str | tuple]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply overrides to a raw mapping (a deep copy).

    Each override is a ``"key=value"`` string, a ``(key, value)`` pair or a
    ``(key, value, label)`` triple (``label`` names it in error messages, e.g. ``"--out"``).
    Returns the new mapping and ``{dotted key: label}``.
    """
    out = copy.deepcopy(raw)
    sources: dict[str, str] = {}
    for item in overrides:
        if isinstance(item, str):
            key, value = parse_override(item)
            label = f"--set {item}"
        elif len(item) == 3:
            key, value, label = item  # type: ignore[misc]
        else:
            key, value = item
            label = f"--set {key}={value!r}"
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{label}: key '{'.'.join(parts[:i + 1])}' is not a mapping")
            node = nxt
        node[parts[-1]] = value
        sources[key] = label
    return out, sources


def where_fn(file_label: str, sources: Mapping[str, str]) -> Callable[[str], str]:
    """``key -> label`` of what set ``key``: an override, else the file."""
    def where(key: str) -> str:
        for k, label in sources.items():
            if key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + "."):
                return label
        return file_label

    return where
