"""The byte-mutation fuzzer over every reader (tests/fuzzing.py says what a case is and what a
pass is): each mutated file must end in a clear tinyrwkv error or a correct load, within a time
and memory bound, and the process must be as good as new afterwards.

CI runs CASES_SHORT cases per kind with hypothesis derandomized (a fixed seed: the same cases
every run); `pytest --long tests/test_fuzz.py` runs CASES_LONG per kind. A failure is shrunk by
hypothesis to a minimal list of mutations, printed with the assertion."""
import faulthandler
import tempfile
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import fuzzing
import tinyrwkv

CASES_SHORT, CASES_LONG = 40, 1000

# A case reads a ~0.3 MB file (the seed model: 2 layers, C=64, V=97) in 10-50 ms on this 2-core
# machine; 5 s is 100x that, room for a loaded CI runner, and far below the minutes the hangs
# this guards against took (exponential pickles ran for over 120 s).
TIME_BOUND_S = 5.0
# Python-visible allocations (NumPy arrays included) while reading one case. The seed's tensors
# are 0.2 MB and a model can only need what its shapes say; 64 MiB is 300x the seed, while the
# amplification bugs this guards against allocated 1 to 5 GB from files under 1 MB.
MEMORY_BOUND = 64 * 2**20
# The whole per-kind test: if a reader hangs, dump every thread's stack and exit rather than
# block CI until its global timeout.
WATCHDOG_S = 900


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    made = fuzzing.make_seeds(folder)
    return {kind: (path, fuzzing.read(kind, path)) for kind, path in made.items()}


def shipped_logits():
    model = tinyrwkv.load(backend="numpy", progress=False)
    logits, _ = model.forward(np.arange(1, 9), None)
    return model.stored_tensors(), logits


@pytest.mark.parametrize("kind", fuzzing.KINDS)
def test_mutated_files_give_a_clear_error_or_a_correct_load(kind, seeds, long_mode, tmp_path):
    if kind not in seeds:
        pytest.skip(f"no seed for {kind}: its writer (torch or gguf) is not installed")
    seed, seed_summary = seeds[kind]
    before_tensors, before_logits = shipped_logits()

    @settings(max_examples=CASES_LONG if long_mode else CASES_SHORT, derandomize=True,
              deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzzing.mutation_strategy())
    def case(mutations):
        folder = tempfile.mkdtemp(dir=tmp_path)
        path = fuzzing.mutated_copy(kind, seed, mutations, folder)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            verdict, _ = fuzzing.run_case(kind, path, seed_summary)
        finally:
            elapsed = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        where = f"{kind}, mutations {fuzzing.describe(mutations)}"
        assert verdict == "ok", f"{where}: {verdict}"
        assert elapsed < TIME_BOUND_S, f"{where}: took {elapsed:.1f} s"
        assert peak < MEMORY_BOUND, f"{where}: allocated {peak / 2**20:.0f} MiB"

    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        # dequantising flipped scales overflows, a flipped head size warns: neither is a failure
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case()
    finally:
        faulthandler.cancel_dump_traceback_later()

    # No case may leave anything behind that changes a later load (the process-poisoning check).
    after_tensors, after_logits = shipped_logits()
    assert after_tensors.keys() == before_tensors.keys()
    for key in before_tensors:
        np.testing.assert_array_equal(after_tensors[key], before_tensors[key], err_msg=key)
    np.testing.assert_array_equal(after_logits, before_logits)


# ---- what the fuzzer found (tests/hostile_report.py), kept as fixed cases ----

def npz_with_header(path, header_text):
    """An .npz whose one member has this .npy header text (format 1.0), then 12 data bytes."""
    import struct
    import zipfile
    header = header_text.encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(12)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("att_shift.npy", member)
    return path


@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (3,",        # tokenize.TokenError
    "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': ",  # SyntaxError
    "{'descr': 'O', 'fortran_order': False, 'shape': (3,), }",        # pickled objects
])
def test_a_broken_npy_header_is_a_clear_error(tmp_path, header):
    """A mutated .npy header made NumPy's header parser raise tokenize.TokenError (not a
    ValueError) through the state-file and trace readers."""
    from tinyrwkv import CheckpointError
    path = npz_with_header(tmp_path / "s.npz", header)
    for read in (lambda: tinyrwkv.load_state(path), lambda: tinyrwkv.oracle.load_trace(path)):
        with pytest.raises(CheckpointError, match="s.npz"):
            read()
