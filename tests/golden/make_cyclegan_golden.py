"""Makes `cyclegan_golden.npz`: two official CycleGAN steps in PyTorch.

Run once in a throwaway venv (never a dependency of the package):

  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
  /tmp/torchvenv/bin/python tests/golden/make_cyclegan_golden.py

The networks, losses, update order and Adam are `benchmarks/
torch_cyclegan.py`'s (the official pytorch-CycleGAN-and-pix2pix code the
authors ran). A tiny config (ngf = ndf = 4, one residual block, a 2-layer
PatchGAN, 16 x 16 images, batch 2) takes two `optimize_parameters` steps
with the history pool off (`pool_size` 0: the pool draws from Python's
`random` and is tested on its own), so the result is deterministic.
`tests/test_translate.py` loads the initial weights into our CycleGAN,
takes the same two steps and compares every loss and every parameter.

Arrays: `init/<name>` and `final/<name>` (official state-dict names, e.g.
`netG_A.1.weight`), `a_<step>`, `b_<step>` ([2, 16, 16, 3] uint8 RGB,
NHWC as our step takes them; torch gets x / 127.5 - 1 in NCHW), `losses_<step>` ([8], in the order of
`LOSS_NAMES`), and `config` (a JSON string).
"""

import importlib.util
import json
import os
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(ngf=4, ndf=4, n_blocks=1, n_layers_d=2, lr=2e-4, beta1=0.5,
              beta2=0.999, lambda_cycle=10.0, lambda_identity=0.5,
              pool_size=0, size=16, batch=2, steps=2, seed=20261207)


def main():
  spec = importlib.util.spec_from_file_location(
      "torch_cyclegan",
      os.path.join(HERE, "..", "..", "benchmarks", "torch_cyclegan.py"))
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)
  torch.manual_seed(CONFIG["seed"])
  torch.set_num_threads(1)
  model = ref.CycleGANModel(types.SimpleNamespace(**CONFIG))
  # Non-zero biases, so that a bias the port dropped or misplaced shows.
  with torch.no_grad():
    for name in ("netG_A", "netG_B", "netD_A", "netD_B"):
      for p in getattr(model, name).parameters():
        if p.ndim == 1:
          p.normal_(0.0, 0.05)
  out = {f"init/{k}": v for k, v in ref.state_arrays(model).items()}
  rng = np.random.default_rng(CONFIG["seed"])
  shape = (CONFIG["batch"], CONFIG["size"], CONFIG["size"], 3)
  # uint8 pixels scaled as ToTensor + Normalize(0.5, 0.5), in float32.
  to_nchw = lambda x: torch.from_numpy(
      (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
      .transpose(0, 3, 1, 2).copy())
  for step in range(CONFIG["steps"]):
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    model.set_input({"A": to_nchw(a), "B": to_nchw(b)})
    model.optimize_parameters()
    losses = model.get_current_losses()
    out[f"a_{step}"], out[f"b_{step}"] = a, b
    out[f"losses_{step}"] = np.array([losses[k] for k in ref.LOSS_NAMES],
                                     np.float32)
  out.update({f"final/{k}": v for k, v in ref.state_arrays(model).items()})
  out["config"] = np.array(json.dumps(CONFIG))
  np.savez_compressed(os.path.join(HERE, "cyclegan_golden.npz"), **out)
  print({k: v.shape for k, v in out.items() if not k.startswith(("init",
                                                                  "final"))})


if __name__ == "__main__":
  main()
