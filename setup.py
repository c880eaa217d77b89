"""Build hook: the top-level ``configs/*.yaml`` go into the wheel as ``pwfn/_configs``.

Everything else about the package lives in ``pyproject.toml``. The repository keeps its configs
at the top level (``configs/``); an installed package finds them through
``pwfn.model.presets`` (the repository folder for an editable install, ``pwfn/_configs`` otherwise).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    """The usual ``build_py``, then a copy of ``configs/*.yaml`` into ``<build>/pwfn/_configs``."""

    def run(self):
        super().run()
        source = HERE / "configs"
        target = Path(self.build_lib) / "pwfn" / "_configs"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.glob("*.yaml")):
            shutil.copyfile(path, target / path.name)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        target = Path(self.build_lib) / "pwfn" / "_configs"
        return outputs + [str(target / p.name) for p in sorted((HERE / "configs").glob("*.yaml"))]


setup(cmdclass={"build_py": BuildPyWithConfigs})
