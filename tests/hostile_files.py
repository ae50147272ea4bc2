"""Every crafted hostile file the tests build, written to one folder for tests/hostile_report.py
to count: the pickles of tests/test_hostile_pth.py (code execution, opcodes, BUILD, views, values,
exploding structures), the GGUF and safetensors headers of tests/test_hostile_readers.py, and the
stray-layer file of the issue. The builders stay in the test modules (one copy); this only writes
their output to disk and says which reader each file goes to.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def all_cases(folder):
    """[(label, kind, path, marker or None)]: kind is a tests/fuzzing.py reader; marker is the
    file a code-execution payload would create if it ran."""
    import test_hostile_pth as pth
    import test_hostile_readers as readers
    folder = Path(folder)
    cases = []

    markers = folder / "markers"
    markers.mkdir(parents=True)
    pth_dir = folder / "pth"
    pth_dir.mkdir()
    payloads = pth.exec_payloads(markers)
    for name, path in pth.write_cases(pth_dir, payloads).items():
        cases.append((f"pickle code execution: {name}", "pth", path, markers / name))
    groups = {"opcode": pth.opcode_cases(), "BUILD": pth.build_cases(),
              "view": pth.view_cases(), "value": pth.value_cases(),
              "structure": pth.structure_cases()}
    for group, built in groups.items():
        sub = pth_dir / group
        sub.mkdir()
        for name, path in pth.write_cases(sub, built).items():
            cases.append((f"pickle {group}: {name}", "pth", path, None))

    st_dir = folder / "safetensors"
    st_dir.mkdir()
    for name, (header, _) in readers.SAFETENSORS_CASES.items():
        path = st_dir / f"{name}.safetensors"
        path.write_bytes(readers.safetensors_bytes(header, bytes(16)))
        cases.append((f"safetensors header: {name}", "safetensors", path, None))
    for name, (weights, _) in readers.inconsistent_cases().items():
        from tinyrwkv.formats import save_safetensors
        path = st_dir / f"inconsistent-{name}.safetensors"
        save_safetensors(path, weights)
        cases.append((f"inconsistent model: {name}", "safetensors", path, None))
    stray = dict(readers.small_weights())
    stray[f"blocks.{readers.STRAY}.att.x_r"] = np.zeros((1, 1, 64), np.float32)
    from tinyrwkv.formats import save_safetensors
    save_safetensors(st_dir / "stray-layer.safetensors", stray)
    cases.append(("stray key blocks.100000000.att.x_r", "safetensors",
                  st_dir / "stray-layer.safetensors", None))

    gguf_dir = folder / "gguf"
    gguf_dir.mkdir()
    for name, (data, _) in readers.crafted_gguf_cases().items():
        path = gguf_dir / f"{name}.gguf"
        path.write_bytes(data)
        cases.append((f"gguf header: {name}", "gguf-f32", path, None))
    return cases
