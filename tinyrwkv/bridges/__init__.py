"""Bridges: other RWKV-7 implementations run with their intermediates recorded under tinyrwkv's
trace names (tinyrwkv/oracle.py, docs/formats.md §8.3), so `tinyrwkv compare` can point inside
them. `tinyrwkv trace --impl NAME` runs one.

Each bridge module has one entry point,

    record(model_path, ids, state=None, select=None, progress=None, **options)
        -> (trace: oracle.Trace, final: model.State or None)

that runs its implementation over `ids` (from `state`, a tinyrwkv State, when given) and returns
what it could observe under trace names: the token axis first, states [value][key], `logits`
always, `final.*` when the implementation exposes its state. Names it cannot observe are absent
(compare lists them as not compared); it never fills one in with tinyrwkv's own numbers.
"""

# name -> module (imported only when asked for: each needs its implementation's package)
IMPLS = {
    "official": "official",       # the `rwkv` package (torch), its v7 functions wrapped
    "llama.cpp": "llamacpp",      # llama-cpp-python, through llama.cpp's graph evaluation callback
    "fla": "fla",                 # flash-linear-attention's RWKV7ForCausalLM, with forward hooks
}


def bridge(name):
    """The bridge module for `name` (one of IMPLS)."""
    import importlib
    if name not in IMPLS:
        raise ValueError(f"unknown implementation {name!r}: choose one of {', '.join(IMPLS)}")
    return importlib.import_module(f".{IMPLS[name]}", __name__)
