"""The papers' experiments by name: the HC rows of HC Tables 1-6, the mHC component ablation, mHC vs
HC, the Frac-Connections ablations and Virtual Width Networks, each at the paper's scale or scaled
down.

  python train.py --config=configs/paper.py:experiment=dhc4,size=cpu --workdir=workdirs/dhc4
  python train.py --config=configs/paper.py:experiment=shc4,size=paper --workdir=gs://B/shc4
  python sweep.py --suite=hc_table1 --size=cpu --seeds=3 --workroot=workdirs/hc_table1
  python sweep.py --suite=depth --size=cpu --seeds=3 --lr_grid=1e-3,3e-3 --lr_grid_seeds=1 ...

Arguments (after ':', comma-separated key=value):
  experiment  a name of EXPERIMENTS (below); `python -c "from configs import paper;
              print(paper.describe())"` lists them with their tables
  size        paper: the paper's model and training setup (OLMo-1B; OLMo-7B for HC Table 5;
                     OLMoE-1B-7B for HC Table 6)
              cpu:   a 4-layer d=128 byte-level model a 2-core CPU trains in minutes
                     (configs/lm.py); the depth rows: d=64 at 4 to 32 blocks (DEPTH_CPU)
              tiny:  seconds-long runs for tests
Every experiment is configs/lm.py's (or configs/moe.py's) switches plus a few overrides: this file
holds one line per experiment (the depth rows, <variant>_L<blocks>, are one generated line per
variant and depth) and SUITES lists the rows of each table; nothing else is repeated.

HC Table 6 (OLMoE-1B-7B, suite hc_table6) uses configs/moe.py; HC Table 4's related methods are
the resi_dual and altup connection kinds. Not here: HC Table 4's PTB and two-hop rows; the mHC
paper's DeepSeek-V3-style MoE, FC's OLMoE-1.3B and VWN's MoE models (their ablations run on the
OLMo-1B shape at size=paper).
"""

import dataclasses
import importlib

from configs import base
from hyperconn_jax import config_lib

# This module is a sweep catalogue (hyperconn_jax/sweep.py's Catalogue): CONFIG_FILE, EXPERIMENTS,
# SUITES, get_config and defaults. CONFIG_FILE: this file as train.py's --config takes it.
CONFIG_FILE = 'configs/paper.py'


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One experiment: config-file switches, leaf overrides and its scale at size=paper."""
  lm_args: str
  overrides: tuple[tuple[str, object], ...] = ()
  paper_size: str = 'olmo_1b'
  about: str = ''
  # The config file whose switches lm_args are: 'lm' (configs/lm.py) or 'moe' (configs/moe.py).
  base: str = 'lm'
  # Leaf overrides applied at size=cpu only, before `overrides` (the depth rows' narrow model).
  cpu_overrides: tuple[tuple[str, object], ...] = ()


def _hc(n, *, dynamic=True, tanh=True, **switches):
  args = f'connection=hc,n={n},dynamic={str(dynamic).lower()},tanh={str(tanh).lower()}'
  return ''.join([args] + [f',{k}={str(v).lower()}' for k, v in switches.items()])


def _mhc(*mappings):
  # Without a learned H_post the replicated streams stay equal and H_res is inert
  # (hyperconn_jax/connections/mhc.py).
  return Experiment('connection=mhc,n=4', (('model.connection.mhc.mappings', tuple(mappings)),),
                    about=f'mHC x4, learned {"+".join(mappings)} (mHC Table 1)')


def _dfc(m, about, *overrides, dynamic=True):
  tanh = str(dynamic).lower()
  return Experiment(f'connection=frac,m={m},dynamic={tanh},tanh={tanh}', tuple(overrides),
                    about=about)


EXPERIMENTS = {
    # Baselines.
    'prenorm': Experiment('connection=residual', about='residual Pre-Norm (OLMo baseline)'),
    'postnorm': Experiment('connection=residual_postnorm', about='residual Post-Norm'),
    # HC Table 1: expansion rate, with and without tanh.
    **{f'dhc{n}': Experiment(_hc(n), about=f'DHC x{n} with tanh') for n in (1, 2, 4, 8)},
    **{f'dhc{n}_notanh': Experiment(_hc(n, tanh=False), about=f'DHC x{n} without tanh')
       for n in (1, 2, 4, 8)},
    # HC Table 2: static HC (no dynamic branch, so no tanh).
    **{f'shc{n}': Experiment(_hc(n, dynamic=False, tanh=False), about=f'SHC x{n}')
       for n in (2, 4)},
    # HC Table 3: non-trainable width connections (A_m, A_r) or B, on DHC x4.
    'dhc4_frozen_wc': Experiment(_hc(4, train_width=False), about='DHC x4, WC not trainable'),
    'dhc4_frozen_b': Experiment(_hc(4, train_beta=False), about='DHC x4, B not trainable'),
    'dhc4_notanh_frozen_wc': Experiment(_hc(4, tanh=False, train_width=False),
                                        about='DHC x4 without tanh, WC not trainable'),
    'dhc4_notanh_frozen_b': Experiment(_hc(4, tanh=False, train_beta=False),
                                       about='DHC x4 without tanh, B not trainable'),
    # HC Table 4: related methods at n = 2 (its DHC rows are dhc2, dhc2_notanh).
    'resi_dual': Experiment('connection=resi_dual', about='ResiDual (Pre-Post-LN)'),
    'altup2': Experiment('connection=altup,n=2', about='AltUp x2'),
    # HC Table 5: the 7B shape.
    'olmo7b_prenorm': Experiment('connection=residual', paper_size='olmo_7b',
                                 about='OLMo-7B residual Pre-Norm'),
    'olmo7b_dhc4': Experiment(_hc(4), paper_size='olmo_7b', about='OLMo-7B DHC x4'),
    # mHC: component ablation (mHC Table 1; the full model is mhc4) and mHC vs HC at n = 4.
    'mhc4_res': _mhc('res'),
    'mhc4_res_pre': _mhc('res', 'pre'),
    'mhc4': Experiment('connection=mhc,n=4', about='mHC x4 (all of H_res, H_pre, H_post)'),
    # The init the paper leaves open: H_pre = 1/n keeps the streams equal (configs/base.py).
    'mhc4_uniform': Experiment('connection=mhc,n=4',
                               (('model.connection.mhc.pre_init', 'uniform'),),
                               about='mHC x4, H_pre = 1/n at init (streams stay equal)'),
    # Frac-Connections (FC Fig. 4): frac-rate, SFC vs DFC, and removing rescale / tanh / norm.
    'dfc2': _dfc(2, 'DFC x2'),
    'dfc4': _dfc(4, 'DFC x4'),
    'sfc4': _dfc(4, 'SFC x4', dynamic=False),
    'dfc2_norescale': _dfc(2, 'DFC x2 without rescale', ('model.connection.frac.scale', False)),
    'dfc2_notanh': _dfc(2, 'DFC x2 without tanh', ('model.connection.frac.tanh', False)),
    'dfc2_nonorm': _dfc(2, 'DFC x2 without norm',
                        ('model.connection.frac.dynamic_norm', 'none')),
    # VWN (VWN section 4): virtual width 1.5x ((m, n) = (2, 3), no GroupNorm, as the paper) and
    # 2x ((2, 4)). The E-wide embedding table cannot be tied to the D-wide unembedding.
    'vwn1_5': Experiment('connection=vwn,m=2,n=3', (('model.connection.vwn.reduce_norm', 'none'),
                                                    ('model.tie_embeddings', False)),
                         about='VWN 1.5x (m=2, n=3), untied embeddings'),
    'vwn2': Experiment('connection=vwn,m=2,n=4', (('model.tie_embeddings', False),),
                       about='VWN 2x (m=2, n=4), untied embeddings'),
    # HC Table 6 / Fig. 1: the sparse OLMoE-1B-7B (configs/moe.py).
    'olmoe_prenorm': Experiment('connection=residual', paper_size='olmoe_1b_7b', base='moe',
                                about='OLMoE-1B-7B residual Pre-Norm'),
    'olmoe_dhc4': Experiment('connection=hc,n=4', paper_size='olmoe_1b_7b', base='moe',
                             about='OLMoE-1B-7B DHC x4'),
}

# The depth suite (docs/results.md, Depth): HC section 1's seesaw (Post-Norm's vanishing gradients,
# Pre-Norm's representation collapse) needs depth. Each variant at each depth; size=cpu makes the
# model narrow (d = 64) and the runs short (80 steps of 8 x 64 tokens, the same for every run: a
# minute or two each on a free 2-core CPU; a GPU affords --set=train.num_steps=..., README). Kept
# checkpoints (keep_every) let analysis/depth.py measure gradients along training. At size=paper a
# row is OLMo-1B's shape with that many blocks.
DEPTHS = (4, 8, 16, 32)
DEPTH_VARIANTS = ('prenorm', 'postnorm', 'dhc4', 'mhc4', 'dfc4')
DEPTH_CPU = (('model.d_model', 64), ('model.num_heads', 2), ('model.head_dim', 32),
             ('model.mlp_dim', 256), ('data.seq_len', 64), ('train.batch_size', 8),
             ('train.num_steps', 80), ('train.eval_every', 80), ('train.eval_batches', 16),
             ('train.checkpoint_every', 20), ('checkpoint.keep_every', 20),
             ('optim.warmup_steps', 8))


def _deep(name, blocks):
  exp = EXPERIMENTS[name]
  return dataclasses.replace(exp, overrides=exp.overrides + (('model.num_layers', blocks),),
                             about=f'{exp.about}, {blocks} blocks', cpu_overrides=DEPTH_CPU)


EXPERIMENTS.update({f'{name}_L{blocks}': _deep(name, blocks) for blocks in DEPTHS
                    for name in DEPTH_VARIANTS})

# Suites (sweep.py --suite): the rows of each table; the first entry is the baseline of the table.
SUITES = {
    'baselines': ('prenorm', 'postnorm'),
    'hc_table1': ('prenorm', 'dhc1_notanh', 'dhc2_notanh', 'dhc4_notanh', 'dhc8_notanh',
                  'dhc1', 'dhc2', 'dhc4', 'dhc8'),
    'hc_table2': ('prenorm', 'shc2', 'dhc2', 'dhc2_notanh', 'shc4', 'dhc4', 'dhc4_notanh'),
    'hc_table3': ('dhc4', 'dhc4_notanh_frozen_wc', 'dhc4_frozen_b', 'dhc4_notanh',
                  'dhc4_frozen_wc', 'dhc4_notanh_frozen_b'),
    'hc_table4': ('prenorm', 'resi_dual', 'altup2', 'dhc2', 'dhc2_notanh'),
    'hc_table5': ('olmo7b_prenorm', 'olmo7b_dhc4'),
    'hc_table6': ('olmoe_prenorm', 'olmoe_dhc4'),
    'mhc_table1': ('prenorm', 'mhc4_res', 'mhc4_res_pre', 'mhc4'),
    'mhc_vs_hc': ('prenorm', 'dhc4', 'mhc4'),
    'mhc_init': ('prenorm', 'mhc4', 'mhc4_uniform'),
    'vwn': ('prenorm', 'vwn1_5', 'vwn2'),
    'fc_ablation': ('prenorm', 'dfc2', 'dfc4', 'sfc4', 'dfc2_norescale', 'dfc2_notanh',
                    'dfc2_nonorm'),
    # docs/results.md: the CPU-scale comparison.
    'report': ('prenorm', 'shc4', 'dhc4', 'mhc4', 'mhc4_uniform', 'dfc4', 'dhc1', 'dhc2', 'dhc8',
               'resi_dual', 'altup2'),
    # docs/results.md, Depth: shallow rows first (they finish first).
    'depth': tuple(f'{name}_L{blocks}' for blocks in DEPTHS for name in DEPTH_VARIANTS),
}

SIZES = ('tiny', 'cpu', 'paper')


def describe() -> str:
  """One line per experiment: name, the suites holding it, what it is."""
  lines = []
  for name, exp in EXPERIMENTS.items():
    suites = ','.join(s for s, rows in SUITES.items() if name in rows)
    lines.append(f'{name:24s} {suites:32s} {exp.about}')
  return '\n'.join(lines)


def defaults():
  """Every config field's default (configs/base.py)."""
  return base.get_config()


def get_config(arg=None):
  """Returns the config of `experiment` at `size` (see the module docstring)."""
  a = config_lib.parse_arg(arg, experiment='dhc4', size='cpu')
  if a.experiment not in EXPERIMENTS:
    raise ValueError(f'config argument experiment={a.experiment!r} must be one of '
                     f'{tuple(EXPERIMENTS)}')
  if a.size not in SIZES:
    raise ValueError(f'config argument size={a.size!r} must be one of {SIZES}')
  exp = EXPERIMENTS[a.experiment]
  size = exp.paper_size if a.size == 'paper' else a.size
  module = importlib.import_module(f'configs.{exp.base}')
  c = module.get_config(f'{exp.lm_args},size={size}')
  for path, value in (exp.cpu_overrides if a.size == 'cpu' else ()) + exp.overrides:
    *parents, leaf = path.split('.')
    node = c
    for key in parents:
      node = node[key]
    node[leaf] = value
  return c
