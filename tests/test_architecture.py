"""The layout's rules that import-linter cannot state: no import cycles between lowra modules.

import-linter (``lint-imports``, run by ``make test``) enforces the layers: device_runtime.formats <- device_runtime
<- sdk <- export, device_runtime without torch. This test adds that no two lowra modules import each other,
directly or through others, including imports deferred into functions (a lazy import that breaks a cycle at run
time is still a cycle in the design).
"""
from __future__ import annotations

import grimp  # comes with import-linter (the dev extra)

PACKAGES = ("lowra.device_runtime", "lowra.sdk", "lowra.export", "lowra.cuda_kernels")


def _is_package(graph, module: str) -> bool:
    return bool(graph.find_children(module))


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph(*PACKAGES)
    cycles = set()
    for module in sorted(graph.modules):
        if not module.startswith("lowra.") or _is_package(graph, module):
            continue  # a package's __init__ re-exporting its children is not a design cycle
        for imported in graph.find_modules_directly_imported_by(module):
            if not imported.startswith("lowra.") or _is_package(graph, imported):
                continue
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain and not any(_is_package(graph, m) for m in chain):
                cycles.add(" -> ".join((module, *chain)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_every_package_ships_in_the_wheel():
    """Each folder with an __init__.py under the mapped folders is listed in pyproject's packages (a missing one
    imports from a checkout and fails from an installed wheel: it happened to lowra.sdk.fleet)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(root / folder).parts]))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
