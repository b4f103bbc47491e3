"""The experiment harness stays out of the training path, and setup.py ships every package."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINING_PATH = ["adapt_pretrain.train", "adapt_pretrain.core", "adapt_pretrain.megatron", "adapt_pretrain.megatron.plugin",
                 "adapt_pretrain.data", "adapt_pretrain.data.stream", "adapt_pretrain.monitor",
                 "adapt_pretrain.monitor.monitor", "adapt_pretrain.flops"]


HARNESS = "adapt_pretrain.experiments"


def harness_imports(path: str, module: str) -> list[str]:
    """`file:line imported-name` for every import statement of one module (module level, inside
    functions, classes and branches alike) that names the harness; relative imports are resolved."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [f"{os.path.relpath(path, REPO)}:{node.lineno} {n}" for n in names
                  if n == HARNESS or n.startswith(HARNESS + ".")]
    return found


def runtime_modules() -> list[tuple[str, str]]:
    """(path, module name) of every Python module of the package outside the harness."""
    root = os.path.join(REPO, "adapt_pretrain")
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.join(folder, d) != os.path.join(root, "experiments"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out.append((path, module))
    return out


def test_runtime_never_imports_the_harness():
    """Every import statement of every runtime module, wherever it sits (a lazy import inside a function
    counts: it runs on the training or eval path all the same)."""
    modules = runtime_modules()
    assert len(modules) > 40 and any(m == "adapt_pretrain.evaluate" for _, m in modules)
    assert not any(".experiments" in m for _, m in modules)
    offenders = [hit for path, module in modules for hit in harness_imports(path, module)]
    assert offenders == [], "runtime modules import the experiment harness:\n" + "\n".join(offenders)


def test_the_scan_sees_every_kind_of_import(tmp_path):
    """The scanner itself: module-level, lazy, relative and `from package import module` forms."""
    pkg = tmp_path / "adapt_pretrain" / "data"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("import os\nimport adapt_pretrain.experiments.compare as c\n"
                   "def f():\n    from adapt_pretrain.experiments.methods import runs\n"
                   "    if True:\n        from ..experiments import pipeline\n"
                   "from adapt_pretrain import experiments\nfrom adapt_pretrain.evaluate import RESULT\n")
    hits = harness_imports(str(src), "adapt_pretrain.data.x")
    lines = sorted({int(h.split(":")[1].split()[0]) for h in hits})
    assert lines == [2, 4, 6, 7], hits


def test_training_path_never_imports_the_harness():
    code = ("import importlib, sys\n"
            f"for name in {TRAINING_PATH!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('adapt_pretrain.experiments')))\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_setup_finds_every_package():
    setuptools = pytest.importorskip("setuptools")
    from distutils.core import run_setup  # setuptools provides distutils on 3.12+
    del setuptools
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        packages = set(run_setup("setup.py", stop_after="init").packages)
    finally:
        os.chdir(cwd)
    on_disk = {os.path.relpath(root, REPO).replace(os.sep, ".") for root, _, files in os.walk(os.path.join(REPO, "adapt_pretrain"))
               if "__init__.py" in files}
    assert on_disk <= packages
    assert {"adapt_pretrain.experiments", "adapt_pretrain.experiments.methods", "adapt_pretrain.kernels"} <= packages
