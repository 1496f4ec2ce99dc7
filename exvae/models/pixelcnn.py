"""VAE with a gated PixelCNN decoder conditioned on z (stands in for the paper's PixelSNAIL).

The paper's best rows ("Exemplar PixelSNAIL") use a VAE whose decoder
p(x|z) is autoregressive over pixels.  This module implements that idea with
a gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders"), not PixelSNAIL (no self-attention, no causal
residual blocks); the latent z is the only global path.

Networks (F = ``config.pixelcnn.channels``, k = ``kernel_size``, p = k // 2,
L = ``num_layers``)::

    q(z|x):   x -> GatedDense(300) -> GatedDense(300) -> Linear mu, clip(Linear) logvar
              (identical to the MLP VAE's encoder)
    cond(z):  z -> GatedDense(hidden[-1]) -> Linear(H*W*F) -> reshape (H, W, F)
              -> 1x1 conv to (L + 1) * 4F: a per-layer bias for the vertical
              and horizontal pre-activations (spatial conditioning)
    p(x|z):   layer 0 (mask 'A') on x, layers 1..L (mask 'B') on the stacks,
              then elu -> 1x1 output head(s)

Each layer has a vertical stack v (what lies strictly above the row) and a
horizontal stack h (the row, left of the pixel), so there is no blind spot::

    v_pre = Conv_{(p+1) x k}(v_in) + cond_v                       [2F]
    h_pre = Conv_{1 x (p+1)}(h_in) + Conv_1x1(v_pre) + cond_h      [2F]
    v     = tanh(v_pre[:F]) * sigmoid(v_pre[F:])
    h     = tanh(h_pre[:F]) * sigmoid(h_pre[F:])         (layer 0)
    h     = h_in + Conv_1x1(tanh(..) * sigmoid(..))      (layers >= 1, residual)

Causality comes from padding and shifting instead of masks: the vertical
convs only see rows above (the 'A' layer's input is shifted down one row,
later vertical inputs already depend only on rows above), the horizontal
convs only see the pixel and its left (the 'A' layer's input is shifted
right one column, so no output sees its own pixel).  With this convention
v at row i depends on image rows < i only, so it feeds h of the same
position without the extra shift of the original paper.

The 1x1 output head gives Bernoulli logits, or a discretised logistic's
``(mean, log_scale)`` (mean through a sigmoid, log_scale clipped to
[-4.5, 0]), as the other models.  Single-channel images only (the paper's
MNIST / Fashion-MNIST / Omniglot rows); colour would need channel-ordering
masks.

Decoding without an image (pictures, generation) is sequential:
:func:`decode_mean_field` fills a zero canvas in raster order with each
pixel's predicted mean (a deterministic "mean-field" picture) and
:func:`sample_images` with real draws.  Both run the network
incrementally: since a row's vertical stack depends only on rows above and
a pixel's horizontal stack only on its left, each row's vertical features
and each pixel's horizontal features are computed once and cached, so one
image costs about one parallel pass instead of H*W of them (the naive
per-pixel full pass is ~800x slower at 28x28).  The tests check the
incremental decoder against the naive one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from exvae.likelihoods import NUM_BINS
from exvae.models.base import Model, Scores
from exvae.models.conv import ConvOutputHead
from exvae.models.hvae import check_likelihood
from exvae.models.vae import MLPEncoderModule, check_matmul_dtype, gaussian_posterior_samples
from exvae.nets.conv import torch_conv_init
from exvae.nets.gated import GatedDense, he_init
from exvae.nets.init import init_model_params

Params = Any


def _gate(a: jax.Array) -> jax.Array:
  """Gated activation tanh(a[..., :F]) * sigmoid(a[..., F:]): (..., 2F) -> (..., F)."""
  h, g = jnp.split(a, 2, axis=-1)
  return jnp.tanh(h) * jax.nn.sigmoid(g)


def _pad(x: jax.Array, top: int = 0, left: int = 0, right: int = 0) -> jax.Array:
  """Zero-pads the two spatial axes of an NHWC array (never the bottom: causal)."""
  return jnp.pad(x, ((0, 0), (top, 0), (left, right), (0, 0)))


class MatmulConv(nn.Module):
  """'VALID' 2-D convolution computed as one matmul over stacked shifted windows (im2col).

  Same parameters and initialisation as ``nn.Conv(features, kernel_size,
  padding='VALID', kernel_init=torch_conv_init)``.  Why not ``nn.Conv``:
  XLA's CPU convolution computes the kernel gradient about 2x slower than
  this form for a 3x5, 64 -> 128 layer on 100 28x28 images (1.1 s vs
  0.58 s), and the PixelCNN's backward pass is dominated by those layers.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
  """

  features: int
  kernel_size: tuple[int, int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, H, W, C) -> (N, H - kh + 1, W - kw + 1, features)."""
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", torch_conv_init, (kh, kw, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate(
      [x[:, a : a + ho, b : b + wo] for a in range(kh) for b in range(kw)], axis=-1
    )  # (N, ho, wo, kh * kw * C), tap-major
    return cols @ kernel.reshape(kh * kw * cin, self.features) + bias


def _dense_1x1(features: int, name: str) -> nn.Dense:
  """A 1x1 convolution as a Dense on the channel axis (a matmul, also in the backward pass)."""
  return nn.Dense(features, kernel_init=torch_conv_init, name=name)


class PixelVAE(MLPEncoderModule):
  """MLP encoder (the MLP VAE's: ``encode``, ``encode_mean``), gated PixelCNN decoder with spatial conditioning on z.

  Attributes:
    image_shape: (H, W, C) of the data; C must be 1.
    latent_dim: size d of z.
    hidden: widths of the encoder's gated dense layers; ``hidden[-1]`` is also
      the width of the conditioning network's gated layer.
    channels: F, feature channels of both stacks.
    num_layers: L, gated residual layers of mask type 'B' after the 'A' layer.
    kernel_size: odd k; vertical convs are (k//2 + 1) x k, horizontal 1 x (k//2 + 1).
    likelihood: 'bernoulli' or 'logistic'.
  """

  image_shape: Sequence[int]
  latent_dim: int = 40
  hidden: Sequence[int] = (300, 300)
  channels: int = 64
  num_layers: int = 6
  kernel_size: int = 5
  likelihood: str = "bernoulli"

  def setup(self):
    check_likelihood(self.likelihood)
    _check_shape(self.image_shape)
    if self.kernel_size < 1 or self.kernel_size % 2 != 1:
      raise ValueError(f"pixelcnn.kernel_size must be odd and >= 1, got {self.kernel_size}.")
    if self.num_layers < 0:
      raise ValueError(f"pixelcnn.num_layers must be >= 0, got {self.num_layers}.")
    h, w, _ = self.image_shape
    f, k, p, n = self.channels, self.kernel_size, self.kernel_size // 2, self.num_layers + 1
    self.enc_layers = [GatedDense(u, name=f"enc_{i}") for i, u in enumerate(self.hidden)]
    self.enc_mu = nn.Dense(self.latent_dim, kernel_init=he_init, name="enc_mu")
    self.enc_logvar = nn.Dense(self.latent_dim, kernel_init=he_init, name="enc_logvar")
    self.cond_hidden = GatedDense(self.hidden[-1], name="cond_hidden")
    self.cond_map = nn.Dense(h * w * f, kernel_init=he_init, name="cond_map")
    # One 1x1 conv for all layers' biases: a single matmul instead of L + 1.
    self.cond_proj = _dense_1x1(n * 4 * f, name="cond_proj")
    self.v_convs = [MatmulConv(2 * f, (p + 1, k), name=f"v_conv_{l}") for l in range(n)]
    self.h_convs = [MatmulConv(2 * f, (1, p + 1), name=f"h_conv_{l}") for l in range(n)]
    self.links = [_dense_1x1(2 * f, name=f"link_{l}") for l in range(n)]
    self.res = [_dense_1x1(f, name=f"res_{l}") for l in range(1, n)]
    self.head = ConvOutputHead(int(self.image_shape[-1]), self.likelihood, name="head")

  # --------------------------------------------------------------------------
  # Decoder pieces, shared by the parallel and the incremental passes
  # --------------------------------------------------------------------------

  def cond(self, z: jax.Array) -> jax.Array:
    """Per-layer conditioning biases: z (N, d) -> (N, H, W, L + 1, 4F).

    ``[..., l, :2F]`` is added to layer l's vertical pre-activation and
    ``[..., l, 2F:]`` to its horizontal one.
    """
    h, w, _ = self.image_shape
    n, f = self.num_layers + 1, self.channels
    m = self.cond_map(self.cond_hidden(z)).reshape((z.shape[0], h, w, f))
    return self.cond_proj(m).reshape((z.shape[0], h, w, n, 4 * f))

  def _v_pre(self, l: int, v_window: jax.Array, cond_l: jax.Array) -> jax.Array:
    """Vertical pre-activation of layer l from a padded window (VALID conv) -> (N, h, w, 2F)."""
    return self.v_convs[l](v_window) + cond_l[..., : 2 * self.channels]

  def _h_bias(self, l: int, v_pre: jax.Array, cond_l: jax.Array) -> jax.Array:
    """The part of layer l's horizontal pre-activation not from the row: v link + cond."""
    return self.links[l](v_pre) + cond_l[..., 2 * self.channels :]

  def _h_out(self, l: int, h_prev: jax.Array | None, h_pre: jax.Array) -> jax.Array:
    """Horizontal output of layer l (residual from layer 1 on, where channels match)."""
    g = _gate(h_pre)
    return g if l == 0 else h_prev + self.res[l - 1](g)

  def _output(self, h: jax.Array):
    return self.head(nn.elu(h))

  def pixel_net(self, x: jax.Array, cond: jax.Array):
    """Teacher-forced decoder output, one parallel pass.

    Args:
      x: (N, H, W, C) images.
      cond: (N, H, W, L + 1, 4F) from :meth:`cond`.

    Returns:
      Logits (N, H, W, C), or ``(mean, log_scale)`` each (N, H, W, C); the
      output at pixel (i, j) depends on x only through pixels before (i, j)
      in raster order.
    """
    h_, w_ = self.image_shape[:2]
    p = self.kernel_size // 2
    # Layer 0 (mask 'A'): the vertical input shifted down one row and the
    # horizontal input right one column, so no output sees its own pixel.
    v_in = _pad(x, top=p + 1, left=p, right=p)[:, : h_ + p]
    h_in = _pad(x, left=p + 1)[:, :, : w_ + p]
    v = h = None
    for l in range(self.num_layers + 1):
      if l > 0:  # mask 'B': own row/pixel allowed
        v_in = _pad(v, top=p, left=p, right=p)
        h_in = _pad(h, left=p)
      c = cond[..., l, :]
      v_pre = self._v_pre(l, v_in, c)
      h = self._h_out(l, h, self.h_convs[l](h_in) + self._h_bias(l, v_pre, c))
      if l < self.num_layers:  # the last v only feeds its link
        v = _gate(v_pre)
    return self._output(h)

  def logits(self, x: jax.Array, z: jax.Array):
    """Teacher-forced p(x|z) parameters: x (N, H, W, C), z (N, d) -> logits or (mean, log_scale)."""
    return self.pixel_net(x, self.cond(z))

  def row_step(
    self, canvas: jax.Array, vcache: jax.Array, cond_row: jax.Array, i: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Vertical stack of row i (incremental decoding).

    Args:
      canvas: (N, H, W, C) image so far; rows < i are final.
      vcache: (L, N, H + p, W + 2p, F) vertical outputs v_0..v_{L-1}, zero
        padded (p rows on top, p columns each side); rows < i are final.
      cond_row: (N, 1, W, L + 1, 4F) conditioning of row i.
      i: row index (traced int).

    Returns:
      ``(vcache with row i written, h_bias (L + 1, N, 1, W, 2F))``: each
      layer's link + conditioning term of the horizontal stack on row i.
    """
    p = self.kernel_size // 2
    # Padded row r + p + 1 of the canvas is image row r; rows i..i+p are image rows i-p-1..i-1.
    window = jax.lax.dynamic_slice_in_dim(_pad(canvas, top=p + 1, left=p, right=p), i, p + 1, 1)
    biases = []
    for l in range(self.num_layers + 1):
      if l > 0:  # padded rows i..i+p: image rows i-p..i
        window = jax.lax.dynamic_slice_in_dim(vcache[l - 1], i, p + 1, 1)
      c = cond_row[..., l, :]
      v_pre = self._v_pre(l, window, c)  # (N, 1, W, 2F)
      biases.append(self._h_bias(l, v_pre, c))
      if l < self.num_layers:
        vcache = jax.lax.dynamic_update_slice(vcache, _gate(v_pre)[None], (l, 0, i + p, p, 0))
    return vcache, jnp.stack(biases)

  def pixel_step(
    self, row: jax.Array, hcache: jax.Array, h_bias: jax.Array, j: jax.Array
  ) -> tuple[jax.Array, Any]:
    """Horizontal stack and output at pixel (i, j) of the current row i.

    Args:
      row: (N, W, C) row i of the image so far; columns < j are final.
      hcache: (L, N, W + p, F) horizontal outputs h_0..h_{L-1} of row i,
        p zero columns on the left; columns < j are final.
      h_bias: (L + 1, N, 1, W, 2F) from :meth:`row_step`.
      j: column index (traced int).

    Returns:
      ``(hcache with column j written, output at (i, j))``; the output is
      logits (N, 1, 1, C) or ``(mean, log_scale)`` each (N, 1, 1, C).
    """
    p = self.kernel_size // 2
    # Padded column c + p + 1 is image column c; columns j..j+p are image columns j-p-1..j-1.
    window = jax.lax.dynamic_slice_in_dim(jnp.pad(row, ((0, 0), (p + 1, 0), (0, 0))), j, p + 1, 1)
    window = window[:, None]  # (N, 1, p + 1, C)
    h = None
    for l in range(self.num_layers + 1):
      if l > 0:  # padded columns j..j+p: image columns j-p..j
        window = jax.lax.dynamic_slice_in_dim(hcache[l - 1], j, p + 1, 1)[:, None]
      bias = jax.lax.dynamic_slice_in_dim(h_bias[l], j, 1, 2)  # (N, 1, 1, 2F)
      h = self._h_out(l, h, self.h_convs[l](window) + bias)  # (N, 1, 1, F)
      if l < self.num_layers:
        hcache = jax.lax.dynamic_update_slice(hcache, h[:, 0][None], (l, 0, j + p, 0))
    return hcache, self._output(h)

  def __call__(self, x: jax.Array):
    """Runs every network once (used by ``init``): x (B, H, W, C) -> decoder output."""
    mu, _ = self.encode(x)
    return self.logits(x, mu)


def _check_shape(image_shape: Sequence[int]) -> None:
  if len(image_shape) != 3 or int(image_shape[-1]) != 1:
    raise ValueError(
      f"The PixelCNN decoder supports single-channel images (H, W, 1) only, got "
      f"{tuple(image_shape)}: colour images need channel-ordering masks, not implemented."
    )


# ----------------------------------------------------------------------------
# Sequential decoding (pure functions of the module and its parameters)
# ----------------------------------------------------------------------------

# write(out, t) -> (N, C): the value written at raster position t, from the
# decoder output at that pixel (logits (N, 1, 1, C) or (mean, log_scale)).
WriteFn = Callable[[Any, jax.Array], jax.Array]


def autoregress(module: PixelVAE, params: Params, z: jax.Array, write: WriteFn) -> jax.Array:
  """Fills a zero canvas in raster order; each pixel gets ``write(network output there, t)``.

  Equivalent to running the whole network on the canvas once per pixel
  (what the tests check) but caches the vertical stack per row and the
  horizontal stack per pixel: rows are a ``fori_loop``, and each row's pixels
  an inner ``fori_loop``, so the program is one compiled body whatever H, W.

  Args:
    module: the (unbound) :class:`PixelVAE`.
    params: its parameters.
    z: (N, d) latent codes.
    write: see :data:`WriteFn`.

  Returns:
    (N, H, W, C) the final canvas.
  """
  apply = functools.partial(module.apply, {"params": params})
  h_, w_, c_ = (int(s) for s in module.image_shape)
  n, f, num_l = z.shape[0], int(module.channels), int(module.num_layers)
  p = int(module.kernel_size) // 2
  cond = apply(z, method="cond")  # (N, H, W, L + 1, 4F)

  def row_body(i, carry):
    canvas, vcache = carry
    cond_row = jax.lax.dynamic_slice_in_dim(cond, i, 1, 1)
    vcache, h_bias = apply(canvas, vcache, cond_row, i, method="row_step")

    def pixel_body(j, carry):
      row, hcache = carry
      hcache, out = apply(row, hcache, h_bias, j, method="pixel_step")
      value = write(out, i * w_ + j)  # (N, C)
      return jax.lax.dynamic_update_slice(row, value[:, None].astype(row.dtype), (0, j, 0)), hcache

    # Stale columns of hcache from the previous row are never read: pixel j
    # reads columns j-p..j, and column j is written before layer l + 1 reads it.
    row0 = jnp.zeros((n, w_, c_), jnp.float32)
    hcache0 = jnp.zeros((num_l, n, w_ + p, f), jnp.float32)
    row, _ = jax.lax.fori_loop(0, w_, pixel_body, (row0, hcache0))
    return jax.lax.dynamic_update_slice(canvas, row[:, None], (0, i, 0, 0)), vcache

  canvas0 = jnp.zeros((n, h_, w_, c_), jnp.float32)
  vcache0 = jnp.zeros((num_l, n, h_ + p, w_ + 2 * p, f), jnp.float32)
  canvas, _ = jax.lax.fori_loop(0, h_, row_body, (canvas0, vcache0))
  return canvas


def _pixel_mean(likelihood: str, out) -> jax.Array:
  """Mean of one pixel's distribution: (N, 1, 1, C) output -> (N, C)."""
  if likelihood == "bernoulli":
    return jax.nn.sigmoid(out[:, 0, 0])
  return out[0][:, 0, 0]  # the logistic location (a sigmoid, in (0, 1))


def mean_field_canvas(module: PixelVAE, params: Params, z: jax.Array) -> jax.Array:
  """The mean-field picture: every pixel set to its predicted mean given the ones before.

  Args:
    module: the :class:`PixelVAE`.
    params: its parameters.
    z: (N, d) codes.

  Returns:
    (N, H, W, C) canvas in [0, 1]; a fixed point: the teacher-forced means on
    it equal it.
  """
  return autoregress(module, params, z, lambda out, t: _pixel_mean(module.likelihood, out))


def decode_mean_field(module: PixelVAE, params: Params, z: jax.Array):
  """Image-free decoder output for pictures: the output of the teacher-forced pass on the mean-field canvas.

  Args:
    module: the :class:`PixelVAE`.
    params: its parameters.
    z: (N, d) codes.

  Returns:
    Logits (N, H, W, C) or ``(mean, log_scale)``; its mean image
    (``mean_fn``) equals :func:`mean_field_canvas` up to float rounding.
  """
  canvas = mean_field_canvas(module, params, z)
  return module.apply({"params": params}, canvas, z, method="logits")


def _pixel_sample(likelihood: str, out, key: jax.Array) -> jax.Array:
  """One draw per image of a pixel: (N, 1, 1, C) output -> (N, C) value."""
  if likelihood == "bernoulli":
    logits = out[:, 0, 0]
    return (jax.random.logistic(key, logits.shape) < logits).astype(jnp.float32)
  mean, log_scale = out[0][:, 0, 0], out[1][:, 0, 0]
  x = mean + jnp.exp(log_scale) * jax.random.logistic(key, mean.shape)
  # Rounding to the nearest of the 256 levels (edges open) is exactly the
  # discretised logistic of exvae.likelihoods.
  return jnp.round(jnp.clip(x, 0.0, 1.0) * (NUM_BINS - 1)) / (NUM_BINS - 1)


@functools.partial(jax.jit, static_argnames=("model",))
def sample_images(model: Model, params: Params, z: jax.Array, key: jax.Array) -> jax.Array:
  """Ancestral samples x ~ p(x|z), drawn pixel by pixel.

  Bernoulli pixels are 0/1 (``logistic noise < logit`` is a Bernoulli(sigmoid(logit))
  draw); logistic pixels are on the 256-level grid.

  Args:
    model: a model built by :func:`make_pixelvae` (static).
    params: its parameters.
    z: (N, d) codes.
    key: PRNG key; pixel t uses ``fold_in(key, t)``.

  Returns:
    (N, H, W, C) images.
  """
  module = model.module
  if not isinstance(module, PixelVAE):
    raise ValueError(f"sample_images needs a PixelCNN model, got {type(module).__name__}.")
  return autoregress(
    module,
    params,
    z,
    lambda out, t: _pixel_sample(module.likelihood, out, jax.random.fold_in(key, t)),
  )


def make_pixelvae(config, image_shape: Sequence[int]) -> Model:
  """Builds the PixelCNN-decoder VAE from ``config``.

  Args:
    config: ConfigDict with ``latent_dim``, ``hidden``, ``likelihood`` and
      ``pixelcnn.{channels, num_layers, kernel_size}``.
    image_shape: (H, W, 1) of the data.

  Returns:
    A :class:`Model`: ``decode(z)`` is the mean-field decoder output
    (:func:`decode_mean_field`, H*W sequential steps), ``score`` is
    teacher-forced (one parallel pass over S copies of x).

  Raises:
    ValueError: unknown likelihood, colour images, bad kernel size,
      ``matmul_dtype`` other than 'float32'.
  """
  check_likelihood(config.likelihood)
  check_matmul_dtype(config, "pixelcnn")
  _check_shape(image_shape)
  image_shape = tuple(int(s) for s in image_shape)
  pc = config.pixelcnn
  d = int(config.latent_dim)
  module = PixelVAE(
    image_shape=image_shape,
    latent_dim=d,
    hidden=tuple(int(h) for h in config.hidden),
    channels=int(pc.channels),
    num_layers=int(pc.num_layers),
    kernel_size=int(pc.kernel_size),
    likelihood=config.likelihood,
  )

  def init(key):
    return init_model_params(module, image_shape, key)

  def encode(params, x):
    return module.apply({"params": params}, x, method="encode")

  def encode_mean(params, x):
    return module.apply({"params": params}, x, method="encode_mean")

  def decode(params, z):
    return decode_mean_field(module, params, z)

  def score(params, x, key, num_samples, log_lik, *, path_weight=None) -> Scores:
    # As vae.gaussian_score (same noise), but the decoder also reads x.
    b = x.shape[0]
    mu, logvar = encode(params, x)
    z, log_q = gaussian_posterior_samples(mu, logvar, key, num_samples, path_weight)
    xr = jnp.broadcast_to(x[:, None], (b, num_samples) + x.shape[1:]).reshape(
      (b * num_samples,) + x.shape[1:]
    )
    out = module.apply({"params": params}, xr, z.reshape(b * num_samples, d), method="logits")
    log_px = log_lik(xr, out).reshape(b, num_samples)
    return Scores(z=z, mu=mu, log_px=log_px, log_p_rest=jnp.zeros_like(log_px), log_q=log_q)

  return Model(
    init=init,
    encode=encode,
    encode_mean=encode_mean,
    decode=decode,
    score=score,
    latent_dim=d,
    image_shape=image_shape,
    module=module,
  )
