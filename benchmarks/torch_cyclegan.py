"""The authors' CycleGAN training in PyTorch, for `benchmarks/translate.py`.

A faithful, compact rendition of what UCVGL's `CFP/CycleGAN` runs (the
official junyanz/pytorch-CycleGAN-and-pix2pix `train.py` with `--model
cycle_gan --no_dropout`), so that our JAX stage can be timed against it in
one run and its networks and losses checked against ours:

- `ResnetGenerator` / `NLayerDiscriminator`: the official layer lists
  (reflection padding, `InstanceNorm2d(affine=False,
  track_running_stats=False)`, every conv biased, `ConvTranspose2d(3, 2, 1,
  output_padding=1)`, tanh; 4x4 PatchGAN convs, leaky ReLU 0.2), weights
  N(0, 0.02) and biases 0 (`init_weights('normal')`);
- `ImagePool`: the official history pool (Python `random`, one image at a
  time, a swap with probability 1/2 once full);
- `CycleGANModel.optimize_parameters`: forward both generators; the
  generators' update with the discriminators frozen (LSGAN, cycle L1 x
  lambda, identity L1 x lambda x lambda_identity); then each discriminator
  on its real images and on pooled detached fakes, (real + fake) / 2;
  Adam(lr, (beta1, 0.999)) for both generators together, one for both
  discriminators;
- `UnalignedDataset`: A read in shuffled order (DataLoader shuffle), B
  drawn uniformly at random, each image opened with PIL, converted to RGB,
  resized to `load_size` square (bicubic), randomly cropped to
  `crop_size`, randomly flipped, `ToTensor` + `Normalize(0.5, 0.5)`; an
  epoch is max(|A|, |B|) images; `DataLoader(num_workers=num_threads)`;
- `train_epoch`: the official loop body: `set_input`,
  `optimize_parameters`, and every `print_freq` steps the losses read back
  as Python floats (`get_current_losses`). No visdom, no HTML pages, no
  checkpoint (ours checkpoints; its cost is timed apart).

torch and torchvision are needed only here (developer machines: `pip
install torch==2.14.1 torchvision==0.29.1`); `available()` says whether
they import. Names follow the official code: `G_A` maps A -> B, `D_A`
judges fakes of B (our `g_ab` and `d_b`).
"""

import random

import numpy as np

# Official loss names, in the order of `get_current_losses`.
LOSS_NAMES = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B",
              "idt_B")


def available() -> bool:
  """Whether torch and torchvision import."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return all(importlib.util.find_spec(name) is not None
             for name in ("torch", "torchvision"))


def networks(ngf, ndf, n_blocks, n_layers_d):
  """(generator, discriminator): zero-argument callables that build a
  freshly initialised official ResnetGenerator / NLayerDiscriminator."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  norm = lambda c: nn.InstanceNorm2d(c, affine=False,
                                     track_running_stats=False)

  class ResnetBlock(nn.Module):

    def __init__(self, dim):
      super().__init__()
      self.conv_block = nn.Sequential(
          nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True),
          norm(dim), nn.ReLU(True),
          nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True),
          norm(dim))

    def forward(self, x):
      return x + self.conv_block(x)

  def generator():
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=True),
              norm(ngf), nn.ReLU(True)]
    for i in range(2):
      mult = 2 ** i
      layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2,
                           padding=1, bias=True),
                 norm(ngf * mult * 2), nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
    for i in range(2):
      mult = 2 ** (2 - i)
      layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2,
                                    padding=1, output_padding=1, bias=True),
                 norm(ngf * mult // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
    return _init(nn.Sequential(*layers))

  def discriminator():
    layers = [nn.Conv2d(3, ndf, 4, stride=2, padding=1),
              nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers_d):
      prev, mult = mult, min(2 ** n, 8)
      layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1,
                           bias=True),
                 norm(ndf * mult), nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2 ** n_layers_d, 8)
    layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1,
                         bias=True),
               norm(ndf * mult), nn.LeakyReLU(0.2, True),
               nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
    return _init(nn.Sequential(*layers))

  def _init(net, gain=0.02):
    for m in net.modules():
      if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        torch.nn.init.normal_(m.weight.data, 0.0, gain)
        torch.nn.init.constant_(m.bias.data, 0.0)
    return net

  return generator, discriminator


class ImagePool:
  """The official history of fakes."""

  def __init__(self, pool_size):
    self.pool_size = pool_size
    self.images = []

  def query(self, images):
    import torch  # pylint: disable=g-import-not-at-top
    if self.pool_size == 0:
      return images
    out = []
    for image in images:
      image = torch.unsqueeze(image.data, 0)
      if len(self.images) < self.pool_size:
        self.images.append(image)
        out.append(image)
      elif random.uniform(0, 1) > 0.5:
        i = random.randint(0, self.pool_size - 1)
        out.append(self.images[i].clone())
        self.images[i] = image
      else:
        out.append(image)
    return torch.cat(out, 0)


class CycleGANModel:
  """The four networks, two Adams, two pools and the official step.

  Args:
    config: a translate config (`cvgl_jax.config_lib.translate_defaults`
      keys: ngf, ndf, n_blocks, n_layers_d, lr, beta1, beta2, lambda_cycle,
      lambda_identity, pool_size).
  """

  def __init__(self, config):
    import itertools  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    c = config
    generator, discriminator = networks(c.ngf, c.ndf, c.n_blocks,
                                        c.n_layers_d)
    self.netG_A, self.netG_B = generator(), generator()
    self.netD_A, self.netD_B = discriminator(), discriminator()
    self.config = c
    self.fake_A_pool = ImagePool(c.pool_size)
    self.fake_B_pool = ImagePool(c.pool_size)
    self.optimizer_G = torch.optim.Adam(
        itertools.chain(self.netG_A.parameters(), self.netG_B.parameters()),
        lr=c.lr, betas=(c.beta1, c.beta2))
    self.optimizer_D = torch.optim.Adam(
        itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()),
        lr=c.lr, betas=(c.beta1, c.beta2))
    self.losses = {}

  def set_input(self, data):
    self.real_A, self.real_B = data["A"], data["B"]

  def forward(self):
    self.fake_B = self.netG_A(self.real_A)
    self.rec_A = self.netG_B(self.fake_B)
    self.fake_A = self.netG_B(self.real_B)
    self.rec_B = self.netG_A(self.fake_A)

  @staticmethod
  def gan_loss(prediction, target_is_real):
    import torch  # pylint: disable=g-import-not-at-top
    target = torch.full_like(prediction, 1.0 if target_is_real else 0.0)
    return torch.nn.functional.mse_loss(prediction, target)

  def backward_d_basic(self, net, real, fake):
    loss = 0.5 * (self.gan_loss(net(real), True) +
                  self.gan_loss(net(fake.detach()), False))
    loss.backward()
    return loss

  def backward_g(self):
    import torch  # pylint: disable=g-import-not-at-top
    l1 = torch.nn.functional.l1_loss
    lam, idt = self.config.lambda_cycle, self.config.lambda_identity
    self.idt_A = self.netG_A(self.real_B)
    self.idt_B = self.netG_B(self.real_A)
    losses = {
        "idt_A": l1(self.idt_A, self.real_B) * lam * idt,
        "idt_B": l1(self.idt_B, self.real_A) * lam * idt,
        "G_A": self.gan_loss(self.netD_A(self.fake_B), True),
        "G_B": self.gan_loss(self.netD_B(self.fake_A), True),
        "cycle_A": l1(self.rec_A, self.real_A) * lam,
        "cycle_B": l1(self.rec_B, self.real_B) * lam,
    }
    sum(losses.values()).backward()
    self.losses.update(losses)

  def optimize_parameters(self):
    self.forward()
    for net in (self.netD_A, self.netD_B):
      net.requires_grad_(False)
    self.optimizer_G.zero_grad()
    self.backward_g()
    self.optimizer_G.step()
    for net in (self.netD_A, self.netD_B):
      net.requires_grad_(True)
    self.optimizer_D.zero_grad()
    self.losses["D_A"] = self.backward_d_basic(
        self.netD_A, self.real_B, self.fake_B_pool.query(self.fake_B))
    self.losses["D_B"] = self.backward_d_basic(
        self.netD_B, self.real_A, self.fake_A_pool.query(self.fake_A))
    self.optimizer_D.step()

  def get_current_losses(self):
    return {k: self.losses[k].item() for k in LOSS_NAMES}


def data_loader(a_paths, b_paths, config, num_workers, seed=0):
  """The official UnalignedDataset in a DataLoader of batch
  `config.batch_size`, shuffled, with `num_workers` worker processes."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import torchvision.transforms as T  # pylint: disable=g-import-not-at-top

  transform = T.Compose(
      [T.Resize([config.load_size] * 2, T.InterpolationMode.BICUBIC),
       T.RandomCrop(config.crop_size)] +
      ([T.RandomHorizontalFlip()] if config.flip else []) +
      [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])

  class UnalignedDataset(torch.utils.data.Dataset):

    def __len__(self):
      return max(len(a_paths), len(b_paths))

    def __getitem__(self, index):
      a = Image.open(a_paths[index % len(a_paths)]).convert("RGB")
      b = Image.open(b_paths[random.randint(0, len(b_paths) - 1)]).convert(
          "RGB")
      return {"A": transform(a), "B": transform(b)}

  generator = torch.Generator()
  generator.manual_seed(seed)
  return torch.utils.data.DataLoader(
      UnalignedDataset(), batch_size=config.batch_size, shuffle=True,
      num_workers=num_workers, generator=generator,
      persistent_workers=num_workers > 0)


def train_epoch(model, loader, print_freq=100, max_steps=None):
  """The official loop body over one epoch; returns the steps taken."""
  steps = 0
  for data in loader:
    model.set_input(data)
    model.optimize_parameters()
    steps += 1
    if steps % print_freq == 0:
      model.get_current_losses()
    if max_steps is not None and steps >= max_steps:
      break
  return steps


def state_arrays(model) -> dict:
  """{name: float32 numpy} of every parameter, under the official names
  (`netG_A.1.weight`, ...)."""
  out = {}
  for name in ("netG_A", "netG_B", "netD_A", "netD_B"):
    for key, value in getattr(model, name).state_dict().items():
      out[f"{name}.{key}"] = value.detach().numpy().astype(np.float32)
  return out


def serve(spec_path):
  """Worker loop for `benchmarks/translate.py`, run under the torch venv.

  Reads a JSON spec {"config": {...}, "a_paths", "b_paths", "num_workers",
  "steps"}, builds the model and the loader, answers "ready", then for each
  command line on stdin answers the seconds it took:
    epoch  `steps` official steps fed by the DataLoader (the official loop);
    step   `steps` official steps on one fixed batch (no data);
    data   `steps` batches of the DataLoader alone;
    quit   exits.
  """
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  with open(spec_path) as f:
    spec = json.load(f)
  config = types.SimpleNamespace(**spec["config"])
  random.seed(config.seed)
  torch.manual_seed(config.seed)
  model = CycleGANModel(config)
  loader = data_loader(spec["a_paths"], spec["b_paths"], config,
                       spec["num_workers"], config.seed)
  steps = spec["steps"]

  def batches():
    while True:
      yield from loader

  stream = batches()
  fixed = next(stream)
  print(f"ready torch {torch.__version__} threads {torch.get_num_threads()}",
        flush=True)
  for line in sys.stdin:
    command = line.strip()
    if command == "quit":
      break
    start = time.perf_counter()
    for i in range(steps):
      if command == "data":
        next(stream)
        continue
      model.set_input(next(stream) if command == "epoch" else fixed)
      model.optimize_parameters()
      if (i + 1) % 100 == 0:
        model.get_current_losses()
    print(f"{time.perf_counter() - start:.6f}", flush=True)


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  serve(sys.argv[1])
