"""Input-pipeline benchmark: tokens/s of `prepare` per worker, and tokens/s that the training input
pipeline delivers per host from token shards (packing, shuffling and batching included), against
the tokens/s that the default config's train step (configs/default.py) consumes on this machine.

The corpus is the running Python's standard library (real text, no download) written as jsonl
documents; the tokenizers are bytes and a byte-level BPE tokenizer.json (GPT-NeoX style) trained
here on a sample of it.

  python benchmarks/data_bench.py --out=runs/data_bench.json --markdown=runs/data_bench.md

See docs/performance.md ('Input pipeline') for the latest results and the exact command.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # pylint: disable=g-import-not-at-top
from configs import base
from configs import default
from hyperconn_jax.data import builders
from hyperconn_jax.data import pipeline
from hyperconn_jax.data import token_prepare


# (seq_len, batch) of the pipeline timings: the default config's (configs/default.py), the base
# config's, and OLMo's sequence length.
PIPELINE_SHAPES = ((128, 16), (256, 32), (2048, 32))


def write_corpus(directory: str, megabytes: float) -> int:
  """Standard-library sources as jsonl documents (8 files) up to `megabytes`; returns bytes."""
  root = builders.stdlib_root()
  files = [open(os.path.join(directory, f'part{i}.jsonl'), 'w') for i in range(8)]
  total = 0
  for k, rel in enumerate(builders.list_stdlib_files(root)):
    with open(os.path.join(root, rel), 'rb') as f:
      text = f.read().decode('utf-8', errors='replace')
    files[k % 8].write(json.dumps({'text': text}) + '\n')
    total += len(text.encode('utf-8'))
    if total >= megabytes * 2**20:
      break
  for f in files:
    f.close()
  return total


def train_bpe(directory: str, corpus: str, vocab_size: int) -> str:
  """A byte-level BPE tokenizer.json trained on the first corpus file."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  with open(os.path.join(corpus, 'part0.jsonl')) as f:
    texts = [json.loads(line)['text'] for line in f]
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.train_from_iterator(texts, hf.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
  path = os.path.join(directory, 'tokenizer.json')
  tok.save(path)
  return path


def time_prepare(corpus: str, out: str, tokenizer: str, tokenizer_path: str,
                 workers: int) -> dict:
  start = time.perf_counter()
  meta = token_prepare.prepare(token_prepare.Options(
      source=os.path.join(corpus, '*.jsonl'), out=out, tokenizer=tokenizer,
      tokenizer_path=tokenizer_path, workers=workers))
  seconds = time.perf_counter() - start
  tokens = sum(meta['num_tokens'].values())
  return {'tokenizer': tokenizer, 'workers': workers, 'tokens': tokens, 'seconds': seconds,
          'tokens_per_s': tokens / seconds, 'tokens_per_s_per_worker': tokens / seconds / workers}


def time_pipeline(shards: str, tokenizer: str, tokenizer_path: str, seq_len: int, batch: int,
                  seconds: float, read_threads: int) -> dict:
  config = base.get_config()
  config.model.vocab_size = 2**16
  config.data.update(dataset='tokens', data_dir=shards, tokenizer=tokenizer,
                     tokenizer_path=tokenizer_path, seq_len=seq_len, read_threads=read_threads)
  config.train.batch_size = batch
  start = time.perf_counter()
  iterator = pipeline.make_train_iterator(config)
  for _ in range(3):
    next(iterator)
  startup = time.perf_counter() - start
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    n += 1
  elapsed = time.perf_counter() - start
  return {'tokenizer': tokenizer, 'seq_len': seq_len, 'batch': batch,
          'read_threads': read_threads, 'batches': n, 'startup_s': startup,
          'tokens_per_s': n * batch * seq_len / elapsed}


def time_default_step(steps: int) -> dict:
  config = default.get_config()
  compiled = bench.Compiled(config, allocate=True)
  compiled.run()
  times = sorted(compiled.run()[0] for _ in range(steps))
  step_s = times[len(times) // 2]
  tokens = config.train.batch_size * config.data.seq_len
  return {'batch': config.train.batch_size, 'seq_len': config.data.seq_len, 'step_s': step_s,
          'tokens_per_s': tokens / step_s}


def markdown(result: dict) -> str:
  step = result['train_step']
  lines = [f"Machine: {result['machine']['cpu']} ({result['machine']['cpu_count']} cores), load "
           f"average {result['machine']['load_average'][0]:.1f} at the start; corpus "
           f"{result['corpus_bytes'] / 2**20:.0f} MiB of jsonl.", '',
           '| prepare | workers | tokens | tokens/s | tokens/s per worker |', '|---|---|---|---|---|']
  for r in result['prepare']:
    lines.append(f"| {r['tokenizer']} | {r['workers']} | {r['tokens']:,} | "
                 f"{r['tokens_per_s'] / 1e6:.2f}M | {r['tokens_per_s_per_worker'] / 1e6:.2f}M |")
  lines += ['', '| pipeline from token shards | seq_len x batch | read threads | tokens/s per host '
            '| x default train step |', '|---|---|---|---|---|']
  for r in result['pipeline']:
    lines.append(f"| {r['tokenizer']} | {r['seq_len']} x {r['batch']} | {r['read_threads']} | "
                 f"{r['tokens_per_s'] / 1e6:.2f}M | {r['tokens_per_s'] / step['tokens_per_s']:.0f}x |")
  lines += ['', f"Default config's train step (configs/default.py, {step['batch']} x "
            f"{step['seq_len']} tokens): {step['step_s'] * 1e3:.0f} ms, "
            f"{step['tokens_per_s'] / 1e3:.1f}k tokens/s.", '']
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--corpus_mb', type=float, default=16)
  p.add_argument('--bpe_vocab', type=int, default=8192)
  p.add_argument('--workers', type=int, nargs='+', default=[1, 2])
  p.add_argument('--seconds', type=float, default=5.0, help='timing window per pipeline setting')
  p.add_argument('--read_threads', type=int, default=base.get_config().data.read_threads)
  p.add_argument('--steps', type=int, default=5, help='timed default train steps')
  p.add_argument('--out', default='')
  p.add_argument('--markdown', default='')
  args = p.parse_args(argv)
  if min(args.workers) < 1:  # Before anything is built (tokens per worker divides by it).
    p.error(f'--workers must each be >= 1 (1 prepares in this process), got {args.workers}')
  result = {'machine': bench.machine(), 'args': vars(args), 'command': ' '.join(sys.argv),
            'prepare': [], 'pipeline': []}
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, 'corpus')
    os.makedirs(corpus)
    result['corpus_bytes'] = write_corpus(corpus, args.corpus_mb)
    bpe = train_bpe(tmp, corpus, args.bpe_vocab)
    shards = {}
    for tokenizer, path in (('bytes', ''), ('huggingface', bpe)):
      for workers in args.workers:
        out = os.path.join(tmp, f'{tokenizer}-{workers}')
        result['prepare'].append(time_prepare(corpus, out, tokenizer, path, workers))
        print(result['prepare'][-1], flush=True)
        shards[tokenizer] = (out, path)
    for tokenizer, (out, path) in shards.items():
      for seq_len, batch in PIPELINE_SHAPES:
        result['pipeline'].append(time_pipeline(out, tokenizer, path, seq_len, batch,
                                                args.seconds, args.read_threads))
        print(result['pipeline'][-1], flush=True)
  result['train_step'] = time_default_step(args.steps)
  result['machine']['load_average_end'] = list(os.getloadavg())
  table = markdown(result)
  print(table)
  bench.write_outputs(args.out, result, args.markdown, table)


if __name__ == '__main__':
  main()
