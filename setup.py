"""Packaging glue that pyproject.toml cannot express: the repository's recipes/ and calib_data/
folders (the source of truth) ship inside the wheel as quantkit/recipes and quantkit/calib_data,
and the optimum-cli registration module installs as optimum/commands/register/quantkit.py.

Everything else (metadata, dependencies, scripts) is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py

# package name in the wheel -> folder in this repository
MAPPED = {
    "quantkit.recipes": "recipes",
    "quantkit.calib_data": "calib_data",
    "optimum.commands.register": "quantkit/integrations/optimum_register",
}


class BuildPy(build_py):
    """Ships calib_data's data files, not the script that built them."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "quantkit.calib_data":
            return []
        return modules


packages = find_namespace_packages(include=["quantkit", "quantkit.*"],
                                   exclude=["quantkit.integrations.optimum_register", "*.__pycache__"])
setup(
    packages=packages + list(MAPPED),
    package_dir=MAPPED,
    package_data={
        "quantkit": ["py.typed"],
        "quantkit.recipes": ["*.yaml"],
        "quantkit.calib_data": ["*.jsonl", "README.md"],
    },
    cmdclass={"build_py": BuildPy},
)
