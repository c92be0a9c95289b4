"""The user's cache folder: what cvgl_jax builds once and reuses.

Holds the compiled CPU depthwise kernel (`cvgl_jax.cpu.depthwise`), the
pretraining stand-in (`cvgl_jax.pretrain`) and JAX's compilation cache
(`cvgl_jax.main`). Nothing in it is a result: deleting it costs only the
time to rebuild.
"""

import getpass
import os
import pathlib
import tempfile


def cache_dirs() -> list[pathlib.Path]:
  """Where cached files are looked for and written, in order of preference.

  `$CVGL_JAX_CACHE_DIR` alone when set; else `$XDG_CACHE_HOME/cvgl_jax`
  (or `~/.cache/cvgl_jax`), then a per-user folder in the temporary
  directory for machines whose home is read-only.
  """
  if os.environ.get("CVGL_JAX_CACHE_DIR"):
    return [pathlib.Path(os.environ["CVGL_JAX_CACHE_DIR"])]
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  per_user = f"cvgl_jax-{getpass.getuser()}"
  return [pathlib.Path(base) / "cvgl_jax",
          pathlib.Path(tempfile.gettempdir()) / per_user]
