"""The backend contract (tinyrwkv/backends/__init__.py): every backend and storage type is traced
through the numbers it really computes with, within float32 agreement of the float64 model on
those same numbers; and the package's import structure (no cycles, no upward imports)."""
import ast
from pathlib import Path

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import oracle
from tinyrwkv.synthetic import make_weights

from conftest import ROOT, have, rel_err

# A trace runs the NumPy reference in float32 on the backend's stored weights; against the float64
# reference on the same stored weights it differs only by float32 rounding (measured 1e-7..2e-6 on
# these shapes). 1e-4 is the bound and leaves 50x; a trace of other weights (bf16 bit
# patterns read as numbers, the old bug) is off by ~1e5.
TRACE_TOL = 1e-4

BACKENDS = [("numpy", "float32"), ("numba", "float32"), ("numba", "bfloat16")]


@pytest.mark.parametrize("backend, storage", BACKENDS)
def test_trace_of_every_backend_is_of_its_stored_weights(tmp_path, backend, storage):
    if backend == "numba" and not have("numba"):
        pytest.skip("numba is not installed")
    from tinyrwkv.formats import save_safetensors
    path = tmp_path / "m.safetensors"
    # official 0.1B LoRA ranks (unequal), head size 64, an awkward vocabulary
    save_safetensors(path, make_weights(2, 256, 1003, ranks=(64, 64, 32, 128), seed=9))
    model = tinyrwkv.load(path, backend=backend, storage=storage)
    ids = np.random.default_rng(2).integers(0, 1003, 21)
    tr = tinyrwkv.trace(model, ids)
    exact = tinyrwkv.RWKV7(model.stored_tensors(), dtype="float64")
    logits64, state64 = exact.forward(ids, full_output=True, mode="recurrent")
    assert tr["logits"].dtype == np.float32
    assert rel_err(tr["logits"], logits64) < TRACE_TOL
    assert rel_err(tr["final.wkv"], state64.wkv) < TRACE_TOL
    # and the backend's own kernels agree with its trace (the same weights, another code path)
    own, _ = model.forward(ids, full_output=True)
    assert rel_err(own, logits64) < TRACE_TOL
    if storage == "bfloat16":     # the stored numbers really are bf16: the low 16 bits are zero
        bits = model.stored_tensors()["blocks.1.att.key.weight"].view(np.uint32)
        assert not np.any(bits & 0xFFFF)
    tr64 = tinyrwkv.trace(model, ids, dtype="float64")
    assert rel_err(tr64["logits"], logits64) < 1e-12


def test_stored_tensors_keep_checkpoint_keys():
    """Weights keep their checkpoint key names on every backend; derived arrays are kept apart."""
    w = make_weights(2, 128, 97, seed=1)
    models = [tinyrwkv.RWKV7(w)]
    if have("numba"):
        from tinyrwkv.backends.numba_cpu import RWKV7Numba
        models.append(RWKV7Numba(w, storage="bfloat16"))
    for model in models:
        stored = model.stored_tensors()
        unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}   # layer 0: never read
        assert set(stored) == set(w) - unused, model.backend
        for key, a in stored.items():
            assert a.dtype == np.float32 and a.size == w[key].size, key


# ---- import structure --------------------------------------------------------------------------

# Layers, lowest first: a module may import from its own layer or below, never above.
LAYERS = [
    {"tinyrwkv.model"},
    {"tinyrwkv.errors", "tinyrwkv.files", "tinyrwkv.checks", "tinyrwkv.sampling", "tinyrwkv.tokenizer",
     "tinyrwkv.prompts",
     "tinyrwkv.schema", "tinyrwkv.synthetic", "tinyrwkv.formats"},
    {"tinyrwkv.backends"},
    {"tinyrwkv.train", "tinyrwkv.oracle", "tinyrwkv.ops"},
    {"tinyrwkv.loader", "tinyrwkv.generate", "tinyrwkv.golden", "tinyrwkv.trainer",
     "tinyrwkv.bridges", "tinyrwkv.chat_format", "tinyrwkv.state_cache", "tinyrwkv.evaluate"},
    {"tinyrwkv.cli_support", "tinyrwkv.chat", "tinyrwkv.server"},
    {"tinyrwkv.cli", "tinyrwkv.__main__", "tinyrwkv"},
]


def _package_imports():
    """{module: set of tinyrwkv modules it imports}, lazy (function-level) imports included."""
    pkg = ROOT / "tinyrwkv"
    out = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                deps.add(mod)
                deps.update(f"{mod}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        out[name] = {d for d in deps if d.startswith("tinyrwkv")}
    names = set(out)
    # a dependency on a package's member counts as that module if it is one, else the package
    return {m: {d if d in names else d.rpartition(".")[0] for d in ds} & names - {m}
            for m, ds in out.items()}


def _layer(module):
    for n, layer in enumerate(LAYERS):
        if any(module == p or (p != "tinyrwkv" and module.startswith(p + ".")) for p in layer):
            return n
    raise AssertionError(f"{module} is in no layer of tests/test_backends.py: place it")


def test_no_import_cycles_and_no_upward_imports():
    graph = _package_imports()
    for module, deps in graph.items():
        for dep in deps:
            if module == "tinyrwkv" or module.startswith(dep + "."):
                continue                       # the package's own __init__, or a parent package
            assert _layer(dep) <= _layer(module), f"{module} imports {dep}, a higher layer"
    seen, stack = {}, []

    def visit(m):
        seen[m] = 1
        stack.append(m)
        for d in graph[m]:
            if d == "tinyrwkv" or m.startswith(d + "."):
                continue
            assert seen.get(d) != 1, "import cycle: " + " -> ".join(stack[stack.index(d):] + [d])
            if d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2
    for m in graph:
        if m not in seen:
            visit(m)


def test_model_py_imports_numpy_only():
    tree = ast.parse((ROOT / "tinyrwkv" / "model.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] if n.level == 0 else "." for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom)}
    assert imported <= {"numpy", "__future__", "dataclasses", "typing"}, imported


def test_no_module_assigns_attributes_of_another():
    """No monkeypatching inside the package: no `module.name = ...` or setattr on another module."""
    for f in (ROOT / "tinyrwkv").rglob("*.py"):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    while isinstance(t, ast.Attribute):
                        if isinstance(t.value, ast.Name) and t.value.id in modules:
                            raise AssertionError(f"{f.name}:{node.lineno} assigns to {t.value.id}.{t.attr}")
                        t = t.value
