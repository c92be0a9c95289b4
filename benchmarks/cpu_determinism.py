r"""Which machine differences change XLA:CPU's numbers (issue #20).

  python benchmarks/cpu_determinism.py

Runs a few jitted ops (a dot, a dot's weight gradient, reductions,
transcendental elementwise functions, a convolution and its gradients) in fresh processes that differ in one thing
from the first: the same settings again, fewer cores in the CPU affinity
mask (XLA sizes its intra-op thread pool by it), or a lower instruction set
for XLA's code generation (`--xla_cpu_max_isa`). Prints, per variant and
op, whether the result is bit-identical to the first process's. A run of
`cvgl_jax.main` is a chain of such ops: where one differs, the digits of a
result may too.
"""

import json
import os
import subprocess
import sys

PROBE = r'''
import hashlib, json, jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
w = jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
img = jnp.asarray(rng.standard_normal((16, 64, 64, 32)), jnp.float32)
k = jnp.asarray(rng.standard_normal((3, 3, 32, 64)), jnp.float32)
big = jnp.asarray(rng.standard_normal((4096, 1024)), jnp.float32)
cv = lambda i, k: jax.lax.conv_general_dilated(
    i, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
ops = {
  "dot x @ w": (lambda x, w: x @ w, (x, w)),
  "dot weight gradient": (
      lambda x, w: jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w), (x, w)),
  "sum of all": (jnp.sum, (big,)),
  "sum over rows": (lambda b: jnp.sum(b, axis=0), (big,)),
  "mean over columns": (lambda b: jnp.mean(b, axis=-1), (big,)),
  "gelu (erf)": (lambda b: jax.nn.gelu(b, approximate=False), (big,)),
  "exp": (jnp.exp, (big,)),
  "log_softmax": (jax.nn.log_softmax, (big,)),
  "rsqrt": (lambda b: jax.lax.rsqrt(jnp.abs(b) + 1.0), (big,)),
  "conv 3x3": (cv, (img, k)),
  "conv kernel gradient": (
      lambda i, k: jax.grad(lambda k: jnp.sum(cv(i, k) ** 2))(k), (img, k)),
  "conv input gradient": (
      lambda i, k: jax.grad(lambda i: jnp.sum(cv(i, k) ** 2))(i), (img, k)),
}
print(json.dumps({name: hashlib.sha256(np.asarray(jax.jit(f)(*a)).tobytes())
                  .hexdigest() for name, (f, a) in ops.items()}))
'''


def run(cores, xla_flags=""):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  out = subprocess.run(
      [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
      check=True, preexec_fn=lambda: os.sched_setaffinity(0, cores))
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  cores = sorted(os.sched_getaffinity(0))
  variants = [(f"the same, again ({len(cores)} cores)", cores, "")]
  if len(cores) > 1:
    variants.append(("1 core", cores[:1], ""))
  variants += [(f"XLA code for {isa}", cores, f"--xla_cpu_max_isa={isa}")
               for isa in ("AVX", "SSE4_2")]
  base = run(cores)
  names = list(base)
  print(f"Bit-identical to a first process on {len(cores)} cores and the "
        f"default instruction set?\n")
  print("| op | " + " | ".join(v[0] for v in variants) + " |")
  print("| --- |" + " --- |" * len(variants))
  results = [run(c, f) for _, c, f in variants]
  for name in names:
    cells = ["yes" if r[name] == base[name] else "**no**" for r in results]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
