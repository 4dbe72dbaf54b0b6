"""Merges JSON results of benchmarks/bench.py (e.g. one run per width) into one markdown table.

  python benchmarks/report.py runs/bench_1024.json runs/bench_256_512.json --markdown=runs/bench.md
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # pylint: disable=g-import-not-at-top


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('results', nargs='+', help='JSON files written by bench.py --out')
  p.add_argument('--markdown', default='', help='markdown output path (default: stdout only)')
  args = p.parse_args(argv)
  results = []
  for path in args.results:
    with open(path) as f:
      results.append(json.load(f))
  table = bench.markdown(results)
  print(table)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(table)


if __name__ == '__main__':
  main()
