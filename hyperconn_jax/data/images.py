"""Image classification data (model.name='vit'): TFDS image datasets through tfds data sources and
grain, with random crop / flip and mixup; and the embedded 'digits' dataset.

'digits' is scikit-learn's bundled copy of the UCI 8x8 handwritten digits (1797 grey images, 10
classes, pixel values 0..16; no download), prepared once as a TFDS builder like the text corpora:
pixels are rescaled to 0..255 uint8 [8, 8, 1], and an image goes to 'validation' when a stable
hash of its index is below 0.2 (about 360 images), else to 'train'. Any other data.dataset is a
prepared TFDS dataset ('cifar10', 'imagenet2012', ...) with the features data.image_key (uint8
[H, W, C]) and data.label_key (int).

Batches are dicts of numpy arrays: 'inputs' float32 [b, S, S, C] in [-1, 1] (S =
model.vit.image_size), 'targets' float32 [b, num_classes] (one-hot; mixed by mixup in training),
'weights' float32 [b] (0 on the padding of the last eval batch).

Training per example: random crop (an image already S x S is padded by data.crop_padding pixels,
reflected, and cropped back to S x S; any other size gets an Inception-style random resized crop
covering at least data.crop_min_area of it, resized to S x S), then a horizontal flip with
probability 1/2 if data.random_flip. Evaluation: S x S images as they are; others resized (shorter
side S / 0.875) and center-cropped. Mixup (data.mixup_alpha > 0, HC Table 12: 0.2) mixes each
local batch with itself rolled by one, with one Beta(alpha, alpha) weight per batch. Every random
choice comes from grain's per-index seeds, so the stream is deterministic and resumes exactly.
Process p of P reads images p, p + P, ... (data.num_shards, the text pipeline's fixed sharding, is
not used here: the global batches depend on the process count).
"""

import hashlib

from absl import flags
import grain
from grain import experimental as grain_experimental
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hyperconn_jax.data import builders
from hyperconn_jax.data import pipeline
from hyperconn_jax.data import sources

DIGITS = 'digits'
DIGITS_EVAL_FRACTION = 0.2
_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=256)


def _index_hash(index: int) -> float:
  """Maps an example index to [0, 1), stably across machines and runs."""
  digest = hashlib.sha1(f'digits/{index}'.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


class Digits(builders._LocalBuilder, skip_registration=True):  # pylint: disable=protected-access
  """scikit-learn's 8x8 handwritten digits as uint8 images; see the module docstring."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='UCI 8x8 handwritten digits (the copy bundled with scikit-learn), pixels '
                    'rescaled from 0..16 to 0..255.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(eval_fraction=DIGITS_EVAL_FRACTION))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top  (only to prepare)
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    is_eval = np.array([_index_hash(i) < DIGITS_EVAL_FRACTION for i in range(len(images))])
    return {'train': self._generate_examples(images, digits.target, np.flatnonzero(~is_eval)),
            'validation': self._generate_examples(images, digits.target, np.flatnonzero(is_eval))}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}


def _builder(data_config) -> tfds.core.DatasetBuilder:
  if data_config.dataset == DIGITS:
    return Digits(data_dir=sources.resolve_data_dir(data_config), file_format='array_record')
  return sources.builder(data_config)


def ensure_prepared(config) -> None:
  """Prepares 'digits' (seconds) if needed; for any other dataset, checks that it is prepared
  (sources.ensure_prepared: raises ValueError with the command that prepares it)."""
  if config.data.dataset == DIGITS:
    sources.prepare(_builder(config.data))
  else:
    sources.ensure_prepared(config)


def _open_split(config, split: str):
  """Prepares / checks the dataset and returns the split's random-access source."""
  data_config = config.data
  ensure_prepared(config)
  builder = _builder(data_config)
  if split not in builder.info.splits:
    raise ValueError(
        f'Split {split!r} (data.train_split / data.eval_split) not in data.dataset='
        f'{data_config.dataset!r}; it has {sorted(builder.info.splits.keys())}.')
  source = builder.as_data_source(split=split)
  if not len(source):
    raise ValueError(f'Split {split!r} of data.dataset={data_config.dataset!r} is empty.')
  example = source[0]
  for field in ('image_key', 'label_key'):
    if data_config[field] not in example:
      raise ValueError(f'data.{field}={data_config[field]!r} is not a feature of data.dataset='
                       f'{data_config.dataset!r}; it has {sorted(example)}.')
  image = np.asarray(example[data_config.image_key])
  channels = image.shape[-1] if image.ndim == 3 else 1
  if channels != config.model.vit.channels:
    raise ValueError(f'data.dataset={data_config.dataset!r} has {channels}-channel images but '
                     f'model.vit.channels={config.model.vit.channels}.')
  return source


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a uint8 [h, w, C] image to [height, width, C]."""
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out.reshape(height, width, channels)


def _random_resized_crop(image, size, min_area, rng) -> np.ndarray:
  """Inception-style crop: random area in [min_area, 1], aspect ratio in [3/4, 4/3]."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(min_area, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = int(round(np.sqrt(area / ratio))), int(round(np.sqrt(area * ratio)))
    if 0 < ch <= h and 0 < cw <= w:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return _resize(image[top:top + ch, left:left + cw], size, size)
  side = min(h, w)  # Fallback: the central square.
  top, left = (h - side) // 2, (w - side) // 2
  return _resize(image[top:top + side, left:left + side], size, size)


def _center_crop(image, size) -> np.ndarray:
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / 0.875 / min(h, w)
  h, w = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
  image = _resize(image, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


class _Example:
  """Source example -> {'inputs', 'targets', 'weights'} (see the module docstring)."""

  def __init__(self, config, train: bool):
    d, v = config.data, config.model.vit
    self._image_key, self._label_key = d.image_key, d.label_key
    self._size, self._num_classes, self._train = v.image_size, v.num_classes, train
    self._padding, self._min_area, self._flip = d.crop_padding, d.crop_min_area, d.random_flip

  def __call__(self, example, rng: np.random.Generator | None = None):
    image = np.asarray(example[self._image_key], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    size = self._size
    if self._train and image.shape[:2] == (size, size):
      p = self._padding
      if p > 0:
        padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode='reflect')
        top, left = rng.integers(0, 2 * p + 1, size=2)
        image = padded[top:top + size, left:left + size]
    elif self._train:
      image = _random_resized_crop(image, size, self._min_area, rng)
    else:
      image = _center_crop(image, size)
    if self._train and self._flip and rng.random() < 0.5:
      image = image[:, ::-1]
    label = int(example[self._label_key])
    if not 0 <= label < self._num_classes:
      raise ValueError(f'label {label} is outside [0, model.vit.num_classes='
                       f'{self._num_classes})')
    return {'inputs': image.astype(np.float32) * (2.0 / 255.0) - 1.0,
            'targets': np.eye(self._num_classes, dtype=np.float32)[label],
            'weights': np.float32(1.0)}


class _EvalRows:
  """Global eval batch g -> this process's rows of it ([first, first + local_batch)): only those
  examples are read; rows past the end of the split are zeros with weight 0."""

  def __init__(self, source, example_fn, batch_size: int, first: int, local_batch: int):
    self._source, self._example_fn = source, example_fn
    self._batch_size, self._first, self._local_batch = batch_size, first, local_batch
    self._zeros = {k: np.zeros_like(v) for k, v in example_fn(source[0]).items()}

  def __call__(self, g: int):
    start = g * self._batch_size + self._first
    stop = min(start + self._local_batch, len(self._source))
    examples = [self._example_fn(self._source[i]) for i in range(start, stop)]
    examples += [self._zeros] * (self._local_batch - len(examples))
    return {k: np.stack([e[k] for e in examples]) for k in self._zeros}


class _Mixup:
  """Mixes a batch with itself rolled by one: lam * x + (1 - lam) * roll(x), same for targets."""

  def __init__(self, alpha: float):
    self._alpha = alpha

  def __call__(self, batch, rng: np.random.Generator):
    lam = np.float32(rng.beta(self._alpha, self._alpha))
    out = dict(batch)
    for key in ('inputs', 'targets'):
      out[key] = lam * batch[key] + (1 - lam) * np.roll(batch[key], 1, axis=0)
    return out


def make_train_iterator(config, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """This process's infinite iterator of augmented training batches (train.batch_size /
  process_count rows); get_state() / set_state() resume it exactly."""
  data_config = config.data
  pipeline._check_process(process_index, process_count)  # pylint: disable=protected-access
  local_batch = pipeline._local_batch_size(  # pylint: disable=protected-access
      config, process_count)
  source = _open_split(config, data_config.train_split)
  if len(source) < process_count:
    raise ValueError(
        f'Split {data_config.train_split!r} of data.dataset={data_config.dataset!r} has '
        f'{len(source)} images, fewer than the {process_count} processes reading it.')
  seed = data_config.shuffle_seed
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat().random_map(_Example(config, train=True), seed=seed)
  ds = ds.batch(local_batch, drop_remainder=True)
  if data_config.mixup_alpha > 0:
    ds = ds.random_map(_Mixup(data_config.mixup_alpha), seed=seed + 1)
  ds = ds.to_iter_dataset(_READ_OPTIONS)
  if data_config.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # See pipeline.make_train_iterator.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return iter(ds)


def make_eval_iterator(config, *, process_index: int = 0, process_count: int = 1,
                       num_batches: int, batch_size: int) -> grain.DatasetIterator:
  """A fresh iterator over the eval split from its beginning: batches of batch_size /
  process_count rows, the last one padded with zero-weight rows; at most num_batches batches
  (<= 0: the whole split). Each process reads only the examples of its own rows."""
  data_config = config.data
  pipeline._check_process(process_index, process_count)  # pylint: disable=protected-access
  local_batch = pipeline.eval_local_batch_size(batch_size, process_count)
  source = _open_split(config, data_config.eval_split)
  rows = _EvalRows(source, _Example(config, train=False), batch_size,
                   process_index * local_batch, local_batch)
  ds = grain.MapDataset.range(-(-len(source) // batch_size)).map(rows)
  ds = ds.to_iter_dataset(_READ_OPTIONS)
  if num_batches > 0:
    ds = grain_experimental.LimitIterDataset(ds, count=num_batches)
  return iter(ds)
