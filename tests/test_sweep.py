"""Sweeps: paper configs, planning and commands, pairing by seed, skip-finished logic, table math
and the report generator on synthetic run directories, and stopping real sweeps of tiny runs by
signal."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

from etils import epath
from flax import nnx
import numpy as np
import pytest

from configs import paper
from hyperconn_jax import config_lib, data, models, rundir, sweep
from hyperconn_jax.analysis import depth, results
import helpers


def test_every_experiment_builds_a_valid_config():
  for name in paper.EXPERIMENTS:
    config_lib.validate(paper.get_config(f'experiment={name},size=tiny'))
  for suite_name, rows in paper.SUITES.items():
    assert rows and all(r in paper.EXPERIMENTS for r in rows), suite_name


def test_experiments_map_to_the_papers_switches():
  def conn(name, size='cpu'):
    """The chosen kind's options (model.connection.<kind>) with the kind as `.kind`."""
    connection = paper.get_config(f'experiment={name},size={size}').model.connection
    options = connection[connection.kind]
    with options.unlocked():
      options.kind = connection.kind
    return options

  assert conn('prenorm').kind == 'residual_prenorm'
  assert conn('postnorm').kind == 'residual_postnorm'
  assert (conn('dhc8').n, conn('dhc8').dynamic, conn('dhc8').tanh) == (8, True, True)
  assert (conn('dhc2_notanh').n, conn('dhc2_notanh').tanh) == (2, False)
  assert (conn('shc4').dynamic, conn('shc4').tanh) == (False, False)
  assert conn('dhc4_frozen_wc').train_width is False and conn('dhc4_frozen_wc').train_beta
  assert conn('dhc4_notanh_frozen_b').train_beta is False
  assert conn('mhc4_res').mappings == ('res',)
  assert conn('mhc4_res_pre').mappings == ('res', 'pre')
  assert set(conn('mhc4').mappings) == {'pre', 'post', 'res'}
  assert (conn('dfc4').kind, conn('dfc4').m, conn('sfc4').dynamic) == ('frac', 4, False)
  assert conn('dfc2_norescale').scale is False and conn('dfc2_notanh').tanh is False
  assert conn('dfc2_nonorm').dynamic_norm == 'none'
  assert (conn('vwn2').kind, conn('vwn2').m, conn('vwn2').n) == ('vwn', 2, 4)
  assert (conn('vwn1_5').n, conn('vwn1_5').reduce_norm) == (3, 'none')
  assert paper.get_config('experiment=dhc4,size=paper').model.d_model == 2048
  assert paper.get_config('experiment=olmo7b_dhc4,size=paper').model.d_model == 4096
  assert paper.get_config('experiment=olmo7b_dhc4,size=cpu').model.d_model == 128
  moe = paper.get_config('experiment=olmoe_dhc4,size=cpu').model
  assert (moe.ffn, moe.connection.kind, moe.connection.hc.n) == ('moe', 'hc', 4)
  assert paper.get_config('experiment=olmoe_dhc4,size=paper').model.moe.num_experts == 64
  with pytest.raises(ValueError, match='experiment'):
    paper.get_config('experiment=dhc3')
  with pytest.raises(ValueError, match='size'):
    paper.get_config('experiment=dhc4,size=huge')


def test_depth_suite_is_every_variant_at_every_depth_on_the_same_tokens():
  rows = paper.SUITES['depth']
  assert len(rows) == len(paper.DEPTH_VARIANTS) * len(paper.DEPTHS) == 20
  assert rows[:2] == ('prenorm_L4', 'postnorm_L4') and rows[-1] == 'dfc4_L32'
  tokens = set()
  for name in rows:
    variant, blocks = name.rsplit('_L', 1)
    cpu = paper.get_config(f'experiment={name},size=cpu')
    config_lib.validate(cpu)
    assert cpu.model.num_layers == int(blocks) and cpu.model.d_model == 64
    # The variant's own connection, as its 4-block report row.
    assert cpu.model.connection.to_dict() == paper.get_config(
        f'experiment={variant},size=cpu').model.connection.to_dict()
    assert cpu.checkpoint.keep_every > 0 and cpu.train.num_steps % cpu.checkpoint.keep_every == 0
    tokens.add(cpu.train.num_steps * cpu.train.batch_size * cpu.data.seq_len)
    tiny = paper.get_config(f'experiment={name},size=tiny')
    assert (tiny.model.num_layers, tiny.model.d_model) == (int(blocks), 32)
  assert tokens == {80 * 8 * 64}
  assert 'prenorm_L32' in paper.describe() and '32 blocks' in paper.describe()
  # The 4-block report rows keep their shape.
  assert paper.get_config('experiment=prenorm,size=cpu').model.d_model == 128


def test_plan_commands_and_overrides(tmp_path):
  corpus = sweep.Corpus('text', (('data.dataset', 'text_files'),
                                 ('data.text_glob', '/data/part_*.txt')))
  overrides = sweep.parse_overrides(['train.num_steps=7', 'config.optim.lr=0.01'], paper)
  assert overrides == (('train.num_steps', 7), ('optim.lr', 0.01))
  runs = sweep.plan(paper, sweep.suite('prenorm,dhc4', paper), 2, [corpus], str(tmp_path),
                    size='tiny', overrides=overrides)
  assert [(r.experiment, r.seed) for r in runs] == [('prenorm', 0), ('prenorm', 1), ('dhc4', 0),
                                                    ('dhc4', 1)]
  assert runs[3].workdir == os.path.join(str(tmp_path), 'text', 'dhc4', 'seed1')
  config = sweep.make_config(runs[3])
  assert (config.seed, config.data.shuffle_seed, config.train.num_steps) == (1, 1, 7)
  assert config.data.text_glob == '/data/part_*.txt' and config.model.connection.hc.n == 4
  cmd = sweep.command(runs[3])
  assert '--config=configs/paper.py:experiment=dhc4,size=tiny' in cmd
  assert "'--config.data.text_glob=/data/part_*.txt'" in cmd  # Quoted for the shell.
  assert '--config.seed=1' in cmd and '--config.train.num_steps=7' in cmd
  assert sweep.suite('hc_table3', paper)[0] == 'dhc4'
  with pytest.raises(ValueError, match='neither a suite'):
    sweep.suite('dhc4,nope', paper)
  with pytest.raises(ValueError, match='no field'):
    sweep.parse_overrides(['train.num_stepz=3'], paper)
  # A learning-rate grid: every experiment at every rate, the rate applied after --set.
  runs = sweep.plan(paper, ('prenorm',), 2, [corpus], str(tmp_path), size='tiny',
                    overrides=overrides, lr_grid=(1e-3, 3e-3))
  assert [(r.lr, r.seed) for r in runs] == [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
  assert runs[3].workdir == os.path.join(str(tmp_path), 'text', 'prenorm', 'lr0.003', 'seed1')
  assert runs[3].name == 'text/prenorm/lr0.003/seed1'
  assert sweep.make_config(runs[3]).optim.lr == 3e-3
  assert sweep.command(runs[3]).endswith('--config.optim.lr=0.003 --workdir=' + runs[3].workdir)
  with pytest.raises(ValueError, match='--lr_grid'):
    sweep.plan(paper, ('prenorm',), 1, [corpus], str(tmp_path), lr_grid=(0.0,))


def test_seed_pairs_data_order_and_shared_initial_weights(tmp_path):
  # Seed s gives every experiment the same batches and the same initial values of the weights
  # they share, so their per-seed differences are paired (analysis/results.py).
  experiments = ('prenorm', 'dhc4', 'mhc4', 'dfc4')
  corpus = sweep.Corpus('stdlib', (('data.data_dir', str(tmp_path / 'tfds')),))
  runs = sweep.plan(paper, experiments, 2, [corpus], str(tmp_path), size='tiny')
  data.ensure_prepared(sweep.make_config(runs[0]))
  weights, batches = {}, {}
  for run in runs:
    config = sweep.make_config(run)
    with nnx.use_eager_sharding(False):
      model = models.build_model(config.model, nnx.Rngs(config.seed))
    weights[run.experiment, run.seed] = {
        path: np.asarray(v) for path, v in helpers.flat(nnx.state(model, nnx.Param)).items()
        if not any('connection' in str(k) or 'streams' in str(k) for k in path)}
    batches[run.experiment, run.seed] = {
        k: np.asarray(v) for k, v in next(data.make_train_iterator(config)).items()}
  for seed in (0, 1):
    base_w = weights['prenorm', seed]
    assert len(base_w) > 5
    for exp in experiments[1:]:
      shared = set(base_w) & set(weights[exp, seed])
      assert shared == set(base_w), exp  # Every Pre-Norm weight exists in the HC variants.
      for path in shared:
        np.testing.assert_array_equal(weights[exp, seed][path], base_w[path], err_msg=str(path))
      for key, value in batches['prenorm', seed].items():
        np.testing.assert_array_equal(batches[exp, seed][key], value, err_msg=key)
  assert not np.array_equal(batches['prenorm', 0]['inputs'], batches['prenorm', 1]['inputs'])
  emb = next(path for path in weights['prenorm', 0] if 'embed' in str(path))
  assert not np.array_equal(weights['prenorm', 0][emb], weights['prenorm', 1][emb])


def test_corpora_are_text_files_without_splitting(tmp_path):
  path = tmp_path / 'book.txt'
  path.write_text(''.join(f'line {i}\n' for i in range(95)))
  corpus = sweep.prepare_corpus(str(path))
  assert corpus == sweep.Corpus('book', (('data.dataset', 'text_files'),
                                         ('data.text_glob', str(path))))
  assert sweep.prepare_corpus('stdlib').overrides == ()
  glob_corpus = sweep.prepare_corpus(str(tmp_path / '*.txt'))
  assert glob_corpus.name == tmp_path.name
  assert dict(glob_corpus.overrides)['data.text_glob'] == str(tmp_path / '*.txt')
  with pytest.raises(ValueError, match='not stdlib'):
    sweep.prepare_corpus(str(tmp_path / 'missing.txt'))


def fake_run(workdir, *, config=None, num_steps=20, losses=(3.0, 2.5), final=None):
  """Writes what a training run of `config` (default: prenorm, tiny, num_steps) leaves behind:
  config.json and metrics.jsonl."""
  os.makedirs(workdir, exist_ok=True)
  if config is None:
    config = paper.get_config('experiment=prenorm,size=tiny')
    config.train.num_steps = num_steps
  num_steps = config.train.num_steps
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json())
  rows = [{'step': 10, 'loss': losses[0]}, {'step': 10, 'eval_loss': losses[0] + 0.1,
                                            'eval_bits_per_byte': 4.0, 'eval_ppl': 20.0}]
  if final is not None:
    rows += [{'step': num_steps, 'loss': losses[1]},
             {'step': num_steps, 'eval_loss': final, 'eval_bits_per_byte': final / math.log(2),
              'eval_ppl': math.exp(final), 'eval_tokens': 1000.0}]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def test_execute_skips_finished_runs_and_records_wall_time(tmp_path):
  runs = sweep.plan(paper, ('prenorm', 'dhc4'), 2, [sweep.Corpus('stdlib')], str(tmp_path),
                    size='tiny')
  fake_run(runs[0].workdir, config=sweep.make_config(runs[0]), final=2.0)  # Finished.
  fake_run(runs[1].workdir, config=sweep.make_config(runs[1]))  # Started, not finished: resumes.
  assert sweep.is_finished(runs[0].workdir) and not sweep.is_finished(runs[1].workdir)
  assert not sweep.is_finished(runs[2].workdir)      # Never started.
  trained = []

  def train_fn(config, workdir):
    trained.append((config.model.connection.kind, config.seed, workdir))
    fake_run(workdir, config=config, final=2.0)

  counts = sweep.execute(runs, train_fn=train_fn, log=lambda _: None)
  assert counts == {'skipped': 1, 'trained': 3}
  assert [t[:2] for t in trained] == [('residual_prenorm', 1), ('hc', 0), ('hc', 1)]
  for run in runs[1:]:
    with open(os.path.join(run.workdir, sweep.RUN_FILE)) as f:
      assert json.load(f)['wall_s'] >= 0
  assert not os.path.exists(os.path.join(runs[0].workdir, sweep.RUN_FILE))
  trained.clear()
  assert sweep.execute(runs, train_fn=train_fn, log=lambda _: None) == {'skipped': 4,
                                                                         'trained': 0}
  assert not trained


def test_execute_refuses_workdirs_of_another_config(tmp_path):
  runs = sweep.plan(paper, ('prenorm', 'dhc4'), 1, [sweep.Corpus('stdlib')], str(tmp_path),
                    size='tiny')
  fake_run(runs[0].workdir, config=sweep.make_config(runs[0]), final=2.0)
  fake_run(runs[1].workdir, final=2.0)  # A finished prenorm run where dhc4 belongs.
  assert sweep.config_mismatch(runs[0].workdir, sweep.make_config(runs[0]),
                               paper.defaults()) == []
  with pytest.raises(ValueError, match=r"(?s)another config.*dhc4/seed0: model.connection.kind: "
                                       r"'residual_prenorm' -> 'hc'"):
    sweep.execute(runs, train_fn=lambda *_: pytest.fail('trained'), log=lambda _: None)


def test_runs_of_older_config_layouts_are_recognised(tmp_path):
  # A finished dhc4 run whose config.json predates the per-kind connection sub-configs (the flat
  # layout) and checkpoint.keep_every: the same config as planned, so it is skipped, not refused.
  runs = sweep.plan(paper, ('dhc4',), 1, [sweep.Corpus('stdlib')], str(tmp_path), size='tiny')
  config = sweep.make_config(runs[0])
  assert config.checkpoint.keep_every == paper.defaults().checkpoint.keep_every
  fake_run(runs[0].workdir, config=config, final=2.0)
  path = os.path.join(runs[0].workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved['model']['connection'] = dict(helpers.OLD_CONNECTION, kind='hc', n=4, index_base=0)
  del saved['checkpoint']['keep_every']

  def save():
    with open(path, 'w') as f:
      json.dump(saved, f)

  save()
  assert sweep.config_mismatch(runs[0].workdir, config, paper.defaults()) == []
  assert sweep.execute(runs, train_fn=lambda *_: pytest.fail('trained'),
                       log=lambda _: None) == {'skipped': 1, 'trained': 0}
  saved['model']['connection']['tanh'] = False  # DHC x4 without tanh: another experiment.
  save()
  assert sweep.config_mismatch(runs[0].workdir, config, paper.defaults()) == [
      'model.connection.hc.tanh: False -> True']


def test_parallel_execute_runs_subprocesses_and_reports_failures(tmp_path):
  runs = sweep.plan(paper, ('prenorm', 'dhc4'), 2, [sweep.Corpus('stdlib')], str(tmp_path),
                    size='tiny')
  fake_run(runs[0].workdir, config=sweep.make_config(runs[0]), final=2.0)  # Not launched.
  started = []
  # Each job writes a finished run, except dhc4 seed 1, whose process fails.
  script = ('import json, os, sys; w = sys.argv[1]; os.makedirs(w, exist_ok=True); '
            'json.dump({"train": {"num_steps": 20}}, open(os.path.join(w, "config.json"), "w")); '
            'open(os.path.join(w, "metrics.jsonl"), "w").write(json.dumps('
            '{"step": 20, "eval_loss": 2.0}) + "\\n"); sys.exit(w.endswith("dhc4/seed1"))')

  def launch_fn(run):
    started.append(run.workdir)
    return subprocess.Popen([sys.executable, '-c', script, run.workdir])

  with pytest.raises(RuntimeError, match=r'1 of 3 runs failed:\n  \[4/4\] stdlib/dhc4/seed1 '
                                         r'\(exit code 1'):
    sweep.execute(runs, jobs=2, launch_fn=launch_fn, log=lambda _: None)
  assert started == [r.workdir for r in runs[1:]]
  for run in runs[1:3]:
    with open(os.path.join(run.workdir, sweep.RUN_FILE)) as f:
      assert json.load(f)['wall_s'] >= 0
  assert not os.path.exists(os.path.join(runs[3].workdir, sweep.RUN_FILE))
  with pytest.raises(ValueError, match='--jobs=0'):
    sweep.execute(runs, jobs=0)
  assert sweep.train_args(runs[0], '/py', '/repo/train.py')[:3] == [
      '/py', '/repo/train.py', '--config=configs/paper.py:experiment=prenorm,size=tiny']


def test_summary_statistics():
  # hc is 0.15 below base on average, and 0.1, 0.2, 0.15 below on seeds 0, 1, 2: unpaired, base's
  # seed spread (std 0.1) dominates; paired, only the spread of the differences (0.05) counts.
  base = {0: 2.0, 1: 2.2, 2: 2.1}
  hc = {0: 1.9, 1: 2.0, 2: 1.95}
  rows = results.summarize({'base': base, 'hc': hc, 'one': {1: 1.0}, 'other_seeds': {5: 1.0,
                                                                                     6: 1.1},
                            'none': {}}, 'base')
  by = {r['variant']: r for r in rows}
  assert by['base']['n'] == 3 and by['base']['mean'] == pytest.approx(2.1)
  assert by['base']['std'] == pytest.approx(np.std([2.0, 2.2, 2.1], ddof=1))
  diffs = [-0.1, -0.2, -0.15]
  assert by['hc']['pairs'] == [0, 1, 2] and by['hc']['diff'] == pytest.approx(-0.15)
  assert by['hc']['diff_se'] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(3))
  assert by['hc']['unpaired_diff'] == pytest.approx(1.95 - 2.1)
  se = math.sqrt(np.var([1.9, 2.0, 1.95], ddof=1) / 3 + np.var([2.0, 2.2, 2.1], ddof=1) / 3)
  assert by['hc']['unpaired_se'] == pytest.approx(se)
  assert by['one']['std'] == 0.0 and by['one']['pairs'] == [1]
  assert by['one']['diff'] == pytest.approx(1.0 - 2.2) and math.isnan(by['one']['diff_se'])
  assert by['other_seeds']['pairs'] == [] and math.isnan(by['other_seeds']['diff'])
  assert by['none']['n'] == 0 and math.isnan(by['none']['mean'])
  assert results.verdict(by['base'], 'base') == 'baseline'
  assert results.verdict(by['hc'], 'base').startswith('lower')  # 0.15 > 2 * 0.029.
  assert results.verdict(by['one'], 'base').startswith('one paired seed')
  assert results.verdict({'variant': 'x', 'n': 3, 'diff': 0.01, 'diff_se': 0.01},
                         'base').startswith('within')
  assert results.verdict({'variant': 'x', 'n': 3, 'diff': 0.05, 'diff_se': 0.01},
                         'base').startswith('higher')


def test_report_from_synthetic_runs(tmp_path):
  # Final losses per (experiment, lr), seeds 0 and 1: prenorm is best at 1e-3, dhc4 at 3e-3.
  finals = {('prenorm', 1e-3): (2.0, 2.1), ('prenorm', 3e-3): (2.05, 2.2),
            ('dhc4', 1e-3): (1.9, 2.0), ('dhc4', 3e-3): (1.8, 1.85)}
  runs = sweep.plan(paper, ('prenorm', 'dhc4'), 2, [sweep.Corpus('stdlib')], str(tmp_path / 'runs'),
                    size='tiny', lr_grid=(1e-3, 3e-3))
  for run in runs:
    config = sweep.make_config(run)
    config.train.num_steps = 20
    fake_run(run.workdir, config=config, final=finals[run.experiment, run.lr][run.seed])
  facts = {'versions': {'python': '3.11.7', 'jax': '0.10.2', 'flax': '0.12.8', 'optax': '0.2.8',
                        'orbax-checkpoint': '0.12.8', 'grain': '0.2.18'},
           'host': {'platform': 'Linux', 'cpu': 'Some CPU', 'cpu_count': 16},
           'backend': 'gpu', 'device_kind': 'NVIDIA H200', 'device_count': 1}
  for run in runs[1:]:  # The first run has no run.json (trained before it existed).
    with open(os.path.join(run.workdir, 'run.json'), 'w') as f:
      json.dump(facts, f)
  collected = results.collect(runs)
  assert [len(v) for v in collected['stdlib'].values()] == [4, 4]
  out = str(tmp_path / 'docs' / 'results')
  params = {'prenorm': {'total': 1000, 'connection': 0}, 'dhc4': {'total': 1010, 'connection': 10}}
  about = {'prenorm': 'Pre-Norm', 'dhc4': 'DHC x4'}
  corpus = results.write_corpus_results('stdlib', collected['stdlib'], 'prenorm', about, params,
                                        out)
  for path in corpus['files']:
    assert os.path.getsize(path) > 0
  with open(os.path.join(out, 'results_stdlib.csv')) as f:
    rows = {r['variant']: r for r in csv.DictReader(f)}
  assert float(rows['dhc4']['eval_loss_mean']) == pytest.approx(1.825)
  assert float(rows['dhc4']['lr']) == 3e-3 and float(rows['prenorm']['lr']) == 1e-3
  assert float(rows['dhc4']['diff']) == pytest.approx(1.825 - 2.05)
  assert rows['dhc4']['seeds'] == '2' and rows['dhc4']['paired_seeds'] == '0 1'
  # Paired: differences -0.2 and -0.25 (SE 0.025); unpaired SE sqrt(0.0354^2 / 2 + 0.0707^2 / 2).
  assert ('| dhc4 | DHC x4 | 0.003 | 2 (0 1) | 1,010 (10) | 1.8250 ± 0.0354 | -0.2250 ± 0.0250 | '
          '-0.2250 ± 0.0559 | lower (beyond 2 SE) |') in corpus['table']
  assert corpus['lr_table'].splitlines()[2:] == ['| prenorm | **2.0500** | 2.1250 |',
                                                 '| dhc4 | 1.9500 | **1.8250** |']
  # The per-seed CSV regenerates the tables without the workdirs.
  regenerated = results.read_seed_csv(os.path.join(out, 'runs_stdlib.csv'))['stdlib']
  assert [len(v) for v in regenerated.values()] == [4, 4]
  again = results.table_rows(results.at_best_lr(regenerated)[0], 'prenorm')
  assert results.markdown_table(again, about, params) == corpus['table']
  one_seed = results.markdown_table(results.table_rows(
      {'prenorm': corpus['best']['prenorm'][:1], 'dhc4': corpus['best']['dhc4'][:1]},
      'prenorm'), about, params)
  assert '| 1.8000 | -0.2000 | -0.2000 | one paired seed: spread unknown |' in one_seed
  report = str(tmp_path / 'docs' / 'results.md')
  analysis_files = {'stdlib': [os.path.join(out, 'stdlib', name) for name in (
      'compare_gain.png', 'analysis/dhc4/lr0.003/connections_20.png',
      'analysis/dhc4/lr0.003/gain_20.png')]}
  results.write_report(report, command='python sweep.py --suite=x', collected=collected,
                       corpus_results={'stdlib': corpus}, analysis_files=analysis_files,
                       baseline='prenorm',
                       about=about, params=params, analysis_tokens={'stdlib': 64},
                       note='A test.',
                       discussion='HC wins nothing here.')
  text = open(report).read()
  assert ('- Trained on: Some CPU (16 cores), Linux; 1 x NVIDIA H200 (gpu); Python 3.11.7, JAX '
          '0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8, grain 0.2.18 (7 of 8 runs).'
          in text)
  assert '- Trained on: unknown (the run has no run.json) (1 of 8 runs).' in text
  assert 'each variant at its best lr of 0.001, 0.003' in text
  assert 'Paired seeds (each with `prenorm`): 0, 1;' in text
  assert corpus['lr_table'] in text
  assert '20 steps x batch 8 x 32 tokens = 5,120 tokens seen per run' in text
  assert '![loss curves](results/loss_stdlib.png)' in text
  assert 'beyond 2 SE: dhc4' in text and 'A test.' in text
  assert '## Discussion\n\nHC wins nothing here.\n' in text
  assert '### Analyses (stdlib, seed 0 of each variant, 64 validation tokens)' in text
  assert '![compare_gain.png](results/stdlib/compare_gain.png)' in text
  assert ('- dhc4: [connections](results/stdlib/analysis/dhc4/lr0.003/connections_20.png) · '
          '[gain](results/stdlib/analysis/dhc4/lr0.003/gain_20.png)\n') in text
  # Regenerating keeps the sections written by other commands (below KEEP_MARKER) and nothing
  # else of the old text.
  tail = f'{results.KEEP_MARKER}\n\n## Depth\n\nWritten by hand.\n'
  with open(report, 'w') as f:
    f.write('# Old report\n\n' + tail)
  results.write_report(report, command='python sweep.py --suite=x', collected=collected,
                       corpus_results={'stdlib': corpus}, analysis_files=analysis_files,
                       baseline='prenorm', about=about, params=params,
                       analysis_tokens={'stdlib': 64})
  again = open(report).read()
  assert again.endswith('\n' + tail) and '# Old report' not in again
  assert again.count('## Setup') == 1 and '## Discussion' not in again


def test_depth_tables_and_plots_from_synthetic_runs(tmp_path):
  # sweep.py --lr_grid=1e-3,3e-3 --lr_grid_seeds=1: seed 0 at both rates, seeds 1 and 2 at seed
  # 0's best. dhc4_L8's later seeds are worse, so averaging every seed would pick 1e-3 instead.
  finals = {('prenorm_L4', 1e-3): {0: 2.0, 1: 2.1, 2: 2.2}, ('prenorm_L4', 3e-3): {0: 2.05},
            ('dhc4_L4', 1e-3): {0: 1.95}, ('dhc4_L4', 3e-3): {0: 1.9, 1: 2.0, 2: 2.15},
            ('prenorm_L8', 1e-3): {0: 2.5, 1: 2.4, 2: 2.6}, ('prenorm_L8', 3e-3): {0: 2.7},
            ('dhc4_L8', 1e-3): {0: 2.0}, ('dhc4_L8', 3e-3): {0: 1.9, 1: 2.3, 2: 2.4}}
  experiments = ('prenorm_L4', 'dhc4_L4', 'prenorm_L8', 'dhc4_L8')
  runs = [run for run in sweep.plan(paper, experiments, 3, [sweep.Corpus('stdlib')],
                                    str(tmp_path / 'runs'), size='tiny', lr_grid=(1e-3, 3e-3))
          if run.seed in finals[run.experiment, run.lr]]
  for run in runs:
    fake_run(run.workdir, config=sweep.make_config(run),
             final=finals[run.experiment, run.lr][run.seed])
  best, means = results.at_best_lr(results.collect(runs)['stdlib'])
  assert means['dhc4_L8'] == {1e-3: 2.0, 3e-3: 1.9}  # Over seed 0, the seed of every rate.
  assert [(r['lr'], r['seed']) for r in best['dhc4_L8']] == [(3e-3, 0), (3e-3, 1), (3e-3, 2)]

  def measured(first, last, grads_init, grads_final):
    """Collapse medians rising from `first` to `last`; gradients [K] at steps 0 and 40."""
    k = len(grads_init)
    return {'collapse': {'layer': list(range(2, k + 1)),
                         'median': list(np.linspace(first, last, k - 1))},
            'gain': {'composite_forward': [1.0] * (k - 1) + [3.0],
                     'composite_backward': [1.0] * k},
            'gradients': {0: {'branch': grads_init}, 40: {'branch': grads_final}}}

  m = {'prenorm_L4': measured(0.5, 0.9, [4, 4, 2, 2, 1, 1, 1, 1], [2] * 8),
       'dhc4_L4': measured(0.3, 0.5, [1] * 8, [1] * 8),
       'prenorm_L8': measured(0.5, 0.95, [8, 8] + [1] * 14, [1, 3] + [1] * 14)}
  rows = depth.table_rows(best, m)
  assert [(r['depth'], r['variant']) for r in rows] == [
      (4, 'prenorm'), (4, 'dhc4'), (8, 'prenorm'), (8, 'dhc4')]
  by = {(r['variant'], r['depth']): r for r in rows}
  # Paired with Pre-Norm at the same depth: -0.6, -0.1, -0.2 at 8 blocks.
  assert by['dhc4', 8]['diff'] == pytest.approx(-0.3)
  assert by['dhc4', 8]['diff_se'] == pytest.approx(np.std([-0.6, -0.1, -0.2], ddof=1) / 3 ** 0.5)
  assert by['dhc4', 4]['diff'] == pytest.approx(-0.25 / 3)
  assert by['dhc4', 4]['verdict'] == 'lower (beyond 2 SE)' and by['prenorm', 8]['lr'] == 1e-3
  assert by['prenorm', 4]['cos_mean'] == pytest.approx(0.7)
  assert by['prenorm', 4]['cos_second_half'] == pytest.approx(np.mean(
      np.linspace(0.5, 0.9, 7)[3:]))
  assert by['prenorm', 4]['grad_ratio_init'] == pytest.approx(4.0)
  assert by['prenorm', 4]['grad_ratio_final'] == pytest.approx(1.0)
  assert by['prenorm', 8]['grad_ratio_final'] == pytest.approx(2.0)
  assert (by['prenorm', 8]['grad_min_final'], by['prenorm', 8]['grad_max_final']) == (1, 3)
  assert (by['prenorm', 4]['gain_forward_max'], by['prenorm', 4]['gain_backward_max']) == (3, 1)
  assert math.isnan(by['dhc4', 8]['cos_mean'])  # Not measured.
  table = depth.markdown_table(rows)
  assert ('| 8 | dhc4 | 0.003 | 3 | 2.2000 ± 0.2646 | -0.3000 ± 0.1528 | within 2 SE (seed noise) '
          '| n/a / n/a |') in table
  assert '| 4 | prenorm | 0.001 | 3 | 2.1000 ± 0.1000 | — | baseline | 0.700 / 0.' in table
  files = depth.write(rows, m, best, str(tmp_path / 'depth'))
  assert [os.path.basename(f) for f in files] == [
      'depth.md', 'depth.csv', 'depth_runs.csv', 'depth_loss.png', 'depth_collapse.png',
      'depth_gradients.png', 'depth_gain.png']
  for f in files:
    assert 0 < os.path.getsize(f) < 150_000, f
  with open(files[2]) as f:
    per_seed = list(csv.DictReader(f))
  assert len(per_seed) == 12 and {r['depth'] for r in per_seed} == {'4', '8'}


def test_lr_grid_seeds_trains_the_grid_on_seed_0_then_the_best_rate(tmp_path):
  argv = [sys.executable, 'sweep.py', '--suite=prenorm,dhc4', '--seeds=3', '--size=tiny',
          '--lr_grid=1e-3,3e-3', '--lr_grid_seeds=1', f'--workroot={tmp_path}', '--print_commands']
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def printed():
    out = subprocess.run(argv, cwd=repo, capture_output=True, text=True, check=True).stdout
    return sorted(line.split('--workdir=')[1].removeprefix(str(tmp_path) + '/')
                  for line in out.splitlines())

  assert printed() == ['stdlib/dhc4/lr0.001/seed0', 'stdlib/dhc4/lr0.003/seed0',
                       'stdlib/prenorm/lr0.001/seed0', 'stdlib/prenorm/lr0.003/seed0']
  finals = {('prenorm', 1e-3): 2.0, ('prenorm', 3e-3): 2.1, ('dhc4', 1e-3): 2.2,
            ('dhc4', 3e-3): 1.9}
  for run in sweep.plan(paper, ('prenorm', 'dhc4'), 1, [sweep.Corpus('stdlib')], str(tmp_path),
                        size='tiny', lr_grid=(1e-3, 3e-3)):
    fake_run(run.workdir, config=sweep.make_config(run), final=finals[run.experiment, run.lr])
  # The grid finished: seeds 1 and 2 at each experiment's best rate on seed 0.
  assert printed() == ['stdlib/dhc4/lr0.003/seed1', 'stdlib/dhc4/lr0.003/seed2',
                       'stdlib/prenorm/lr0.001/seed1', 'stdlib/prenorm/lr0.001/seed2']


def _wait_for(predicate, what, proc, log_path, timeout=300.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      with open(log_path) as f:
        tail = f.read()[-3000:]
      raise AssertionError(f'{what}: not reached (exit code {proc.poll()}):\n{tail}')
    time.sleep(0.2)


def _training(workdir) -> bool:
  """True once the run's training loop logged an update (its SIGTERM handler is installed)."""
  return any('loss' in r for r in rundir.read_metrics(workdir))


def _log_has(log_path, text) -> bool:
  with open(log_path) as f:
    return text in f.read()


def test_sweep_stops_on_sigterm_or_second_ctrl_c_and_says_how_to_resume(tmp_path):
  # Real sweeps of never-ending tiny runs: the signal is what ends them.
  argv = [sys.executable, 'sweep.py', '--suite=prenorm,dhc4', '--seeds=1', '--size=tiny',
          '--set=train.num_steps=100000', f'--set=data.data_dir={tmp_path / "tfds"}',
          '--analyze=false']
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def start(name, *flags):
    log_path = str(tmp_path / f'{name}.log')
    with open(log_path, 'w') as log:
      proc = subprocess.Popen(argv + [f'--workroot={tmp_path / name}', *flags], cwd=repo, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    workdirs = [str(tmp_path / name / 'stdlib' / exp / 'seed0') for exp in ('prenorm', 'dhc4')]
    return proc, log_path, workdirs

  def assert_stopped(proc, log_path, code):
    assert proc.wait(timeout=300) == code, open(log_path).read()[-3000:]
    text = open(log_path).read()
    assert 'To resume, run the same command again' in text and '--suite=prenorm,dhc4' in text
    return text

  # --jobs=2: SIGTERM to the sweep stops both train.py children, each after a checkpoint.
  proc, log_path, workdirs = start('jobs2', '--jobs=2')
  _wait_for(lambda: all(map(_training, workdirs)), 'both runs training', proc, log_path)
  proc.send_signal(signal.SIGTERM)
  text = assert_stopped(proc, log_path, 128 + signal.SIGTERM)
  assert 'the sweep stopped on SIGTERM with 2 of 2 runs unfinished' in text
  for workdir in workdirs:
    assert _log_has(os.path.join(workdir, 'train.log'), 'Stopping after step')
    assert os.listdir(os.path.join(workdir, 'checkpoints'))
    assert not sweep.is_finished(workdir)

  # In process: the first Ctrl-C lets the run go on; the second stops it after a checkpoint, and
  # the next run never starts.
  proc, log_path, workdirs = start('jobs1')
  _wait_for(lambda: _training(workdirs[0]), 'the first run training', proc, log_path)
  proc.send_signal(signal.SIGINT)
  _wait_for(lambda: _log_has(log_path, 'Ctrl-C again'), 'the first Ctrl-C noted', proc, log_path)
  steps = len(rundir.read_metrics(workdirs[0]))
  _wait_for(lambda: len(rundir.read_metrics(workdirs[0])) > steps, 'training after the first Ctrl-C',
            proc, log_path)
  proc.send_signal(signal.SIGINT)
  text = assert_stopped(proc, log_path, 128 + signal.SIGINT)
  assert 'Stopping after step' in text and 'with 2 of 2 runs unfinished' in text
  assert os.listdir(os.path.join(workdirs[0], 'checkpoints'))
  assert not os.path.exists(workdirs[1])


def test_sweep_in_a_bucket(gcs_bucket, tmp_path):
  # The whole sweep in gs:// (GCS emulator): two train.py jobs train into the bucket, their logs
  # are copied there when they end, the tables and the report are written there, and the next
  # call skips the finished runs.
  workroot, report = f'{gcs_bucket}/sweep', f'{gcs_bucket}/docs/results.md'
  steps = ['--set=train.num_steps=4', '--set=train.eval_every=4',
           '--set=train.checkpoint_every=4', '--set=train.log_every=2']
  argv = [sys.executable, 'sweep.py', '--suite=prenorm,dhc4', '--seeds=1', '--size=tiny',
          *steps, f'--set=data.data_dir={tmp_path / "tfds"}', '--analyze=false', '--jobs=2',
          f'--workroot={workroot}', f'--report={report}']
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # One CPU device (not the tests' 8): smaller compiles; sharded training is tested elsewhere.
  done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'))
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 'Sweep: 2 trained, 0 already finished.' in done.stderr
  runs = sweep.plan(paper, ('prenorm', 'dhc4'), 1, [sweep.Corpus('stdlib')], workroot,
                    size='tiny', overrides=sweep.parse_overrides(
                        [a.removeprefix('--set=') for a in steps] +
                        [f'data.data_dir={tmp_path / "tfds"}'], paper, 'tiny'))
  for run in runs:
    assert run.workdir.startswith(f'{workroot}/stdlib/') and sweep.is_finished(run.workdir)
    assert sweep.wall_time(run.workdir) > 0
    assert 'Starting from scratch' in (epath.Path(run.workdir) / sweep.LOG_FILE).read_text()
    assert not sweep.log_path(run).exists()  # The local copy is gone once in the bucket.
  table = (epath.Path(workroot) / 'results' / 'results_stdlib.md').read_text()
  assert '| prenorm |' in table and '| dhc4 |' in table
  seeds = results.read_seed_csv(f'{workroot}/results/runs_stdlib.csv')['stdlib']
  assert sorted(seeds) == ['dhc4', 'prenorm'] and all(len(v) == 1 for v in seeds.values())
  text = epath.Path(report).read_text()
  assert table.splitlines()[0] in text and '(../sweep/results/loss_stdlib.png)' in text
  assert (epath.Path(workroot) / 'results' / 'loss_stdlib.png').stat().length > 0
  assert sweep.execute(runs, train_fn=lambda *_: pytest.fail('trained'),
                       log=lambda _: None) == {'skipped': 2, 'trained': 0}
