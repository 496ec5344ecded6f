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
    "training/config.py": "FitConfig: one field per setting of the command (~50), each with its type and range check",
    "inference/checks.py": "the checks of a user's program, each with its one-line message",
    "inference/estimators.py": "every estimator over one streaming pass, and the public names of 0.1",
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


def layer_of(module: str) -> str:
    """The layer of a dotted module name: its subpackage, or ``faces`` for the top modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "faces"


def imports_of(path: Path) -> set[str]:
    """The ppl_vae modules ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ppl_vae"):
                for alias in node.names:  # `from . import x` imports the module x
                    sub = f"{target}.{alias.name}"
                    found.add(
                        sub
                        if (REPO / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (REPO / Path(*sub.split("."))).is_dir()
                        else target
                    )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ppl_vae")}
    return found


def test_the_docs_table_names_every_layer():
    allowed = layer_table()
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(allowed) == packages | {"faces"}, (sorted(allowed), sorted(packages))
    assert allowed["core"] == set()


def test_every_import_points_down_the_layer_table():
    allowed = layer_table()
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        here = layer_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        for target in imports_of(path):
            there = layer_of(target) if target.count(".") >= 1 else "faces"
            if target in ("ppl_vae",) or target.startswith("ppl_vae.__"):
                continue  # __version__
            if there != here and there not in allowed[here]:
                wrong.append(f"{path.relative_to(REPO)} ({here}) imports {target} ({there})")
    assert not wrong, "imports against docs/index.md's table:\n" + "\n".join(wrong)


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The test above can fail: a programs module importing training is reported."""
    allowed = layer_table()
    fake = tmp_path / "ppl_vae" / "programs"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..training.train import Trainer\nfrom . import model\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    targets = imports_of(fake / "bad.py")
    assert "ppl_vae.training.train" in targets
    assert layer_of("ppl_vae.training.train") == "training" and "training" not in allowed["programs"]


def test_no_module_is_far_over_300_lines():
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    over = {m: n for m, n in sizes.items() if n > 330 and m not in LONG}
    assert not over, over
