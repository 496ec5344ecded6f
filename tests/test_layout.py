"""The layout holds: every import inside ppl_vae points down the layer table of docs/index.md
(read from the docs, so the table and the code cannot drift apart), and no module is far over
~300 lines without a reason recorded here."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ppl_vae"
# module: why it may exceed 330 lines. `ruff format` at 110 columns (0.3) grew the package from
# 6000 to 7154 lines without a change of content (a call's arguments one per line); before it
# no module was over 327 lines.
LONG = {
    "programs/model.py": "the VAE program: model and guide for one or two layers, chain or skip",
}


def layer_table() -> dict[str, set[str]]:
    """{layer: the layers it may import}, from docs/index.md's architecture table."""
    text = (REPO / "docs" / "index.md").read_text()
    table = text[text.index("| layer | package | may import |") :].split("\n\n")[0]
    allowed = {}
    for row in table.splitlines()[2:]:
        layer, _, may, _ = [c.strip() for c in row.strip("|").split("|")]
        allowed[layer] = {m.strip() for m in may.split(",") if m.strip()}
    return allowed


def layer_of(module: str, root: Path = REPO) -> str:
    """The layer of a dotted name under ``root``: its subpackage (``ppl_vae.data``,
    ``ppl_vae.data.splits`` → ``data``), else ``faces``: the top modules (``ppl_vae.fit``), the
    package root itself and any name imported from it (``ppl_vae.load_dataset``, which loads
    the faces' modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (root / "ppl_vae" / parts[1]).is_dir() else "faces"


def imports_of(path: Path, root: Path = REPO) -> set[str]:
    """The ppl_vae names ``path`` (a file under ``root``) imports, relative imports resolved:
    ``from X import a`` gives ``X.a`` when that is a module or package, else ``X``, except that
    from the package root it always gives ``ppl_vae.a`` (``from .. import __version__`` is
    ``ppl_vae.__version__``; ``from ppl_vae import load_dataset`` is ``ppl_vae.load_dataset``);
    ``import ppl_vae`` gives ``ppl_vae``."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "ppl_vae":
                found |= {f"ppl_vae.{alias.name}" for alias in node.names}
            elif target.startswith("ppl_vae."):
                for alias in node.names:  # `from . import x` imports the module x
                    sub = f"{target}.{alias.name}"
                    where = root / Path(*sub.split("."))
                    found.add(sub if where.with_suffix(".py").exists() or where.is_dir() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "ppl_vae" or a.name.startswith("ppl_vae.")}
    return found


def violations(root: Path = REPO) -> list[str]:
    """Each import in ``root/ppl_vae`` that docs/index.md's table forbids, one line each. Only
    ``__version__`` may come from the package root to any layer: every other name there is the
    public facade, which loads ``fit`` and ``evaluate`` (the top layer, ``faces``)."""
    allowed = layer_table()
    wrong = []
    for path in sorted((root / "ppl_vae").rglob("*.py")):
        here = layer_of(".".join(path.relative_to(root).with_suffix("").parts), root)
        for target in sorted(imports_of(path, root)):
            if target == "ppl_vae.__version__":
                continue
            there = layer_of(target, root)
            if there != here and there not in allowed[here]:
                wrong.append(f"{path.relative_to(root)} ({here}) imports {target} ({there})")
    return wrong


def test_the_docs_table_names_every_layer():
    """The table names exactly the subpackages and ``faces``, and ``core`` imports nothing."""
    allowed = layer_table()
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(allowed) == packages | {"faces"}, (sorted(allowed), sorted(packages))
    assert allowed["core"] == set()


def test_every_import_points_down_the_layer_table():
    """No module of ppl_vae imports a layer the table does not allow it (see ``violations``)."""
    wrong = violations()
    assert wrong == [], "imports against docs/index.md's table:\n" + "\n".join(wrong)


def test_the_checker_catches_an_upward_import(tmp_path):
    """``violations``, the loop of the test above, run on a small fake package: it reports an
    upward relative import (programs → training), a name from the package root in a low layer
    (``from ppl_vae import load_dataset`` in data: the facade, which loads fit) and ``import
    ppl_vae`` in core, and nothing else: not ``from .. import __version__``, not the imports the
    table allows (faces → training, training → programs, programs → core, within a layer)."""
    files = {
        "__init__.py": '__version__ = "0"\n',
        "fit.py": "from .training.train import Trainer\nfrom . import __version__\n",
        "training/__init__.py": "",
        "training/train.py": "from .. import __version__\nfrom ..programs import model\n"
        "from . import optim\n",
        "training/optim.py": "",
        "programs/__init__.py": "",
        "programs/model.py": "from ..core.errors import UserError\nimport ppl_vae.programs.nets\n",
        "programs/nets.py": "",
        "programs/bad.py": "from ..training.train import Trainer\nfrom . import model\n",
        "data/__init__.py": "from .. import __version__\n",
        "data/bad.py": "def f():\n    from ppl_vae import load_dataset\n",
        "core/__init__.py": "",
        "core/errors.py": "",
        "core/bad.py": "import ppl_vae\n",
    }
    for name, text in files.items():
        (tmp_path / "ppl_vae" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ppl_vae" / name).write_text(text)
    assert violations(tmp_path) == [
        "ppl_vae/core/bad.py (core) imports ppl_vae (faces)",
        "ppl_vae/data/bad.py (data) imports ppl_vae.load_dataset (faces)",
        "ppl_vae/programs/bad.py (programs) imports ppl_vae.training.train (training)",
    ]


def test_no_module_is_far_over_300_lines():
    """No module is over 330 lines unless LONG says why."""
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    over = {m: n for m, n in sizes.items() if n > 330 and m not in LONG}
    assert not over, over
