"""Serve the repository's ``sweeps/`` folder to Hydra, so ``python train.py -m +sweep=sst2_study``
finds ``sweeps/sst2_study.yaml``.

A search-path plugin looks for ``sweeps/`` next to the primary config folder (``conf/``) of an
ftexp checkout and adds it through a small config source. That source maps the group ``sweep``
to the YAML files at the top of ``sweeps/``; any sub-folder of ``sweeps/`` is a group of its own
(``sweeps/launcher/slurm.yaml`` is ``+launcher=slurm``). Nothing else changes on the search path.
"""

from __future__ import annotations

import builtins
import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

SCHEME = "ftexpsweeps"
GROUP = "sweep"


def sweeps_dir_for(config_dir: str) -> str | None:
    """``<checkout>/sweeps`` when ``config_dir`` is an ftexp checkout's ``conf/``; else None."""
    root = os.path.dirname(os.path.abspath(config_dir))
    sweeps = os.path.join(root, "sweeps")
    if os.path.isdir(sweeps) and os.path.isdir(os.path.join(root, "ftexp")):
        return sweeps
    return None


class FtexpSweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in list(search_path.get_path()):
            path = element.path or ""
            if element.provider != "main" or ("://" in path and not path.startswith("file://")):
                continue
            sweeps = sweeps_dir_for(path[len("file://"):] if path.startswith("file://") else path)
            if sweeps is not None:
                search_path.append(provider="ftexp-sweeps", path=f"{SCHEME}://{sweeps}")
            return


class FtexpSweepsConfigSource(ConfigSource):
    """Config source over ``sweeps/``: ``sweep/<name>`` -> ``sweeps/<name>.yaml``."""

    def __init__(self, provider: str, path: str) -> None:
        if "://" not in path:
            path = f"{SCHEME}://{path}"
        super().__init__(provider=provider, path=path)

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _disk(self, config_path: str) -> str | None:
        """The file or folder on disk for a Hydra config path; None when it maps to nothing."""
        parts = [p for p in config_path.split("/") if p]
        if not parts:
            return self.path
        if parts[0] == GROUP:
            rest = parts[1:]
            if not rest:
                return self.path
            if len(rest) > 1:  # sweep configs are flat
                return None
            return os.path.join(self.path, rest[0])
        folder = os.path.join(self.path, parts[0])
        if not os.path.isdir(folder):
            return None
        return os.path.join(self.path, *parts)

    def load_config(self, config_path: str) -> ConfigResult:
        disk = self._disk(self._normalize_file_name(config_path))
        if disk is None or not os.path.isfile(disk):
            raise ConfigLoadError(f"Config not found : {config_path} (looked in {self.path})")
        with open(disk, encoding="utf-8") as fh:
            header = ConfigSource._get_header_dict(fh.read(512))
            fh.seek(0)
            cfg = OmegaConf.load(fh)
        return ConfigResult(config=cfg, path=self.full_path(), provider=self.provider, header=header)

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        parts = [p for p in config_path.split("/") if p]
        if parts and parts[0] == GROUP:
            return len(parts) == 1
        disk = self._disk(config_path)
        return disk is not None and os.path.isdir(disk)

    def is_config(self, config_path: str) -> bool:
        parts = [p for p in config_path.split("/") if p]
        if not parts or (parts[0] != GROUP and len(parts) == 1):
            return False  # no root-level configs: sweeps are only reachable as sweep=<name>
        disk = self._disk(self._normalize_file_name(config_path))
        return disk is not None and os.path.isfile(disk)

    def list(self, config_path: str, results_filter: ObjectType | None) -> builtins.list[str]:
        parts = [p for p in config_path.split("/") if p]
        found: set[str] = set()
        if not parts:
            if results_filter in (None, ObjectType.GROUP):
                found.add(GROUP)
                found.update(d for d in os.listdir(self.path)
                             if os.path.isdir(os.path.join(self.path, d)) and not d.startswith((".", "_")))
            return sorted(found)
        disk = self._disk(config_path)
        if disk is None or not os.path.isdir(disk):
            return []
        for name in os.listdir(disk):
            full = os.path.join(disk, name)
            if os.path.isfile(full) and name.endswith(".yaml"):
                if results_filter in (None, ObjectType.CONFIG):
                    found.add(name[: -len(".yaml")])
            elif os.path.isdir(full) and parts[0] != GROUP and not name.startswith((".", "_")):
                if results_filter in (None, ObjectType.GROUP):
                    found.add(name)
        return sorted(found)
