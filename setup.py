"""The wheel's packages and data files (pyproject.toml holds the rest). configs/ sits at the top of the repository,
beside simsearch/, and the wheel carries those same files as the package `simsearch.configs`: package_dir maps
the folder, so there is one source and never a second copy. Each group folder (configs/data/, ...) is found and
listed as a package of its own, so a new group ships without an edit here."""

from setuptools import find_namespace_packages, setup

CONFIGS = ["simsearch.configs", *(f"simsearch.configs.{group}" for group in find_namespace_packages(where="configs"))]

setup(
    packages=[*find_namespace_packages(include=["simsearch", "simsearch.*"], exclude=["*.__pycache__"]), *CONFIGS],
    package_dir={"simsearch.configs": "configs"},
    package_data={"simsearch.web": ["*.html", "*.js", "*.css"], **{package: ["*.yaml"] for package in CONFIGS}},
)
