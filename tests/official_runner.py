"""Run the official `rwkv` package (0.8.32, torch, `cpu fp32`) on checkpoints and save its outputs.

Used by the tests as a subprocess, because the package reads RWKV_V7_ON / RWKV_DE_VERSION once at
import time (plain x070 and DeepEmbed need separate processes). Usage:
    python official_runner.py jobs.json
jobs.json: a list of {"pth": path, "ids": [...], "split": int, "init_state": npz path or null,
"out": npz path, optional "time_state": a state-tuning .pth (RWKV-PEFT's keys
blocks.{i}.att.time_state, read with torch.load and put in the state's WKV slots as they are, as
a user of the package would: the RWKV-7 state is [head][value][key] like the file)}. For each job it writes: seq_logits (T1, V) for ids[:split] from the initial state,
cont_logits (V,) after feeding ids[split:] on, the state after all ids (att_shift, wkv, ffn_shift),
and one_logits (T, V), one_* states when feeding the ids one at a time.
"""
import json
import os
import sys

os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rwkv.model import RWKV  # noqa: E402


def to_list_state(npz, L):
    state = []
    for i in range(L):
        state += [torch.tensor(npz["att_shift"][i]), torch.tensor(npz["wkv"][i]),
                  torch.tensor(npz["ffn_shift"][i])]
    return state


def from_list_state(state, L):
    return {"att_shift": np.stack([state[3 * i].numpy() for i in range(L)]),
            "wkv": np.stack([state[3 * i + 1].numpy() for i in range(L)]),
            "ffn_shift": np.stack([state[3 * i + 2].numpy() for i in range(L)])}


def copy_state(state):
    return None if state is None else [s.clone() for s in state]


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for job in json.load(open(sys.argv[1])):
        assert job["pth"].endswith(".pth")
        model = RWKV(job["pth"][:-4], "cpu fp32")       # the official loader appends '.pth'
        L = model.n_layer
        init = to_list_state(np.load(job["init_state"]), L) if job["init_state"] else None
        if job.get("time_state"):
            tuned = torch.load(job["time_state"], map_location="cpu", weights_only=True)
            init = []
            for i in range(L):
                S = tuned[f"blocks.{i}.att.time_state"].float()        # (H, N, N)
                C = S.shape[0] * S.shape[1]
                init += [torch.zeros(C), S, torch.zeros(C)]
        ids, split = job["ids"], job["split"]
        out = {}
        # The official forward writes the new state into the list it is given: pass copies.
        logits, state = model.forward(ids[:split], copy_state(init), full_output=True)
        out["seq_logits"] = logits.float().numpy()
        logits, state = model.forward(ids[split:], state)
        out["cont_logits"] = logits.float().numpy()
        out.update({"seq_" + k: v for k, v in from_list_state(state, L).items()})
        state, rows = copy_state(init), []
        for t in ids:
            logits, state = model.forward([t], state)
            rows.append(logits.float().numpy())
        out["one_logits"] = np.stack(rows)
        out.update({"one_" + k: v for k, v in from_list_state(state, L).items()})
        np.savez(job["out"], **out)


if __name__ == "__main__":
    main()
