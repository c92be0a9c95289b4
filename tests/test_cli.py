"""The entry points as a user meets them: `--help` exits 0 and lists the
flags; each mistake is one line `error: ...`, exit status 2, no traceback.

Every case is a real `python -m cvgl_jax.<entry point>` process; they run
side by side (each spends its seconds importing JAX, none computes).
"""

import os
import subprocess
import sys

import processes

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
DEMO = os.path.join(CONFIGS, "synthetic_unsup.py")


def _run_all(cases):
  """{name: argv} -> {name: CompletedProcess-like (returncode, out, err)}."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=processes.xla_flags())
  procs = {name: subprocess.Popen([sys.executable, "-m", *argv], env=env,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, argv in cases.items()}
  out = {}
  for name, p in procs.items():
    stdout, stderr = p.communicate(timeout=300)
    out[name] = (p.returncode, stdout, stderr)
  return out


def test_help_exits_0_and_lists_the_flags():
  entry = {"cvgl_jax.main": "--workdir", "cvgl_jax.export": "--out",
           "cvgl_jax.report": "--num_examples",
           "cvgl_jax.retrieve": "--bundle", "cvgl_jax.baseline": "--size"}
  results = _run_all({m: [m, "--help"] for m in entry})
  for module, flag in entry.items():
    code, stdout, stderr = results[module]
    assert code == 0, (module, stderr[-2000:])
    assert flag in stdout, module
  # The job flags are shared by the commands that run on a pod's workers.
  for module in ("cvgl_jax.main", "cvgl_jax.export", "cvgl_jax.report"):
    assert "--num_processes" in results[module][1], module


def test_each_mistake_is_one_line_and_exit_2(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n  pass\n")
  empty = tmp_path / "empty.py"
  empty.write_text("X = 1\n")
  work = f"--workdir={tmp_path / 'run'}"
  main = ["cvgl_jax.main", f"--config={DEMO}", work]
  cases = {
      # name: (argv, what the line must say)
      "missing config": (["cvgl_jax.main", "--config=nope/cfg.py", work],
                         "nope/cfg.py: cannot load this config file"),
      "config syntax": (["cvgl_jax.main", f"--config={broken}", work],
                        "invalid syntax at line 1"),
      "no get_config": (["cvgl_jax.main", f"--config={empty}", work],
                        "defines no get_config()"),
      "mistyped group": (main + ["--config.trian.lr=3"],
                         "--config.trian.lr: the config has no key 'trian' "
                         "(did you mean 'train'?)"),
      "mistyped key": (main + ["--config.train.lrr=3"],
                       "no key 'lrr' (did you mean 'lr'?)"),
      "bad value": (main + ["--config.train.lr=abc"],
                    "--config.train.lr=abc"),
      "out of range": (main + ["--config.train.lr=-1"],
                       "config.train.lr=-1.0 must be > 0"),
      "cache chunk": (main + ["--config.train.grad_cache_chunk=12"],
                      "grad_cache_chunk=12 must divide config.train."
                      "batch_size=32"),
      "bad stage": (main + ["--config.stages=('cfp','trnslate')"],
                    "'trnslate' (did you mean 'translate'?)"),
      "unknown flag": (main + ["--bogus"], "Unknown command line flag"),
      "no workdir": (["cvgl_jax.main", f"--config={DEMO}"],
                     "--workdir"),
      "contradiction": (main + ["--distributed=off", "--num_processes=2"],
                        "--distributed=off contradicts"),
      "export no run": (["cvgl_jax.export", f"--workdir={tmp_path / 'no'}",
                         f"--out={tmp_path / 'b'}"], "export refused"),
  }
  results = _run_all({name: argv for name, (argv, _) in cases.items()})
  for name, (_, expected) in cases.items():
    code, _, stderr = results[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (name, stderr[-2000:])
    assert "Traceback" not in stderr, (name, stderr[-2000:])
    assert lines[-1].startswith("error: ") and expected in lines[-1], (
        name, lines[-3:])
    # One line: nothing else but the quiet console's own progress lines.
    assert all(not line.startswith(" ") for line in lines), (name, lines)
