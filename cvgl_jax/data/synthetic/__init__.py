"""The synthetic cross-view world: geometrically consistent pairs of a
north-up satellite tile and a 360 deg ground panorama of one 3-D scene.

Panoramas follow the project's panorama convention, stated once in
`cvgl_jax/cfp/geometry.py` (module docstring, "Panorama convention").

Modules, one concept each:
  config    `SyntheticConfig`: every size and nuisance knob.
  world     `make_world`: a seeded procedural world (height field, materials,
            colours, trees, and its lit satellite view).
  render    `render_panorama`, `render_satellite`: the two views of a pose.
  layouts   `write_dataset`: CVUSA / CVACT / VIGOR layouts on disk plus the
            `synthetic_truth.json` side file.
  __main__  the CLI:
            python -m cvgl_jax.data.synthetic --layout=cvusa --out=DIR \\
                --num_pairs=N --seed=S [--map_cells=... --sat_px=...]
"""

from cvgl_jax.data.synthetic.config import SyntheticConfig
from cvgl_jax.data.synthetic.config import VIGOR_CITIES
from cvgl_jax.data.synthetic.layouts import LAYOUTS
from cvgl_jax.data.synthetic.layouts import TRUTH_FILE
from cvgl_jax.data.synthetic.layouts import write_dataset
from cvgl_jax.data.synthetic.render import Pose
from cvgl_jax.data.synthetic.render import render_panorama
from cvgl_jax.data.synthetic.render import render_satellite
from cvgl_jax.data.synthetic.world import make_world
from cvgl_jax.data.synthetic.world import World
