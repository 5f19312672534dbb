"""The package's import rule (docs/ARCHITECTURE.md): dependencies run one way, from the
application down to the kernels, and no two modules import each other, lazy imports included."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pytransformer"

# Lowest first. A module may import from its own unit and from units of lower layers; the
# single-module units of the foundation (first) and of the application (last) may also import
# each other, and the cycle test keeps those imports one way.
LAYERS = [
    {"checks", "io", "_native", "_C", "_cuda"},
    {"ops"},
    {"nn"},
    {"decode"},
    {"models"},
    {"train", "text"},
    {"translator", "preprocess", "interop", "cli", "demo", "vision_demo", "plot", "numbers",
     "cuda", "__init__", "__main__"},
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every pytransformer module `path` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pytransformer"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pytransformer":
                continue
            for alias in node.names:  # `from . import ops` names a module, not an attribute
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    found.discard(name)
    return found


def _exists(module: str) -> bool:
    rel = pathlib.Path(*module.split(".")[1:])
    if module in ("pytransformer._C", "pytransformer._cuda"):  # the compiled extensions
        return True
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"pytransformer.{unit} is in no layer of tests/test_layout.py")


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            flat = _layer(a) in (0, len(LAYERS) - 1)
            if a != b and (_layer(b) > _layer(a) or (_layer(b) == _layer(a) and not flat)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layer rule: " + ", ".join(sorted(wrong))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_rule_sees_lazy_and_relative_imports():
    """The checker itself: a lazy relative import inside a function is found."""
    src = PACKAGE / "models" / "state.py"
    assert "pytransformer.nn.layers" in _imports(src)
    assert "pytransformer.checks" in _imports(src)
    lazy = PACKAGE / "cli.py"
    assert "pytransformer.translator" in _imports(lazy)  # imported inside a command function


def test_public_names_survive_the_layout():
    import pytransformer as pt
    from pytransformer.decode import generate, translate
    from pytransformer.models.lm import TransformerLM
    from pytransformer.models.transformer import Transformer
    from pytransformer.train.trainer import Trainer

    assert pt.Transformer is Transformer and pt.TransformerLM is TransformerLM
    assert pt.Trainer is Trainer
    assert pt.TransformerConfig is pt.models.TransformerConfig
    assert callable(pt.ops.matmul) and callable(pt.ops.attention)
    cfg = pt.TransformerConfig(src_vocab_size=9, tgt_vocab_size=9, d_model=8, num_heads=2, d_ff=8,
                               num_encoder_layers=1, num_decoder_layers=1, max_len=8)
    model, lm = pt.Transformer(cfg).eval(), pt.TransformerLM(cfg).eval()
    sources = [[3, 4, 5], [6]]
    assert [r.hypotheses for r in model.translate(sources, beam_size=2, max_decoding_length=4)] \
        == [r.hypotheses for r in translate(model, sources, beam_size=2, max_decoding_length=4)]
    assert lm.generate([[3, 4]], max_new_tokens=3, temperature=0.0) \
        == generate(lm, [[3, 4]], max_new_tokens=3, temperature=0.0)
