"""The package layout's one import direction: utils/ imports neither models/ nor training/ (README, Layout)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_packages(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):   # also the imports inside functions
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_utils_imports_neither_models_nor_training():
    found = {os.path.relpath(path, ROOT): sorted(set(imported_packages(path)) & {"models", "training"})
             for path in glob.glob(os.path.join(ROOT, "utils", "*.py"))}
    assert found and not any(found.values()), {path: names for path, names in found.items() if names}


def test_models_never_import_training_or_the_scripts():
    scripts = {os.path.splitext(os.path.basename(path))[0] for path in glob.glob(os.path.join(ROOT, "*.py"))}
    for path in glob.glob(os.path.join(ROOT, "models", "*.py")):
        assert not set(imported_packages(path)) & ({"training"} | scripts), path
