"""Prepares data once: token shards (any corpus) or a TFDS dataset as array_record.

Token shards (data.dataset='tokens', data.data_dir=OUT; see token_prepare.py and token_shards.py):

  python prepare.py --source='corpus/*.parquet' --out=gs://BUCKET/tokens/web \
      --tokenizer=huggingface --tokenizer_path=gs://BUCKET/gpt-neox-20b/tokenizer.json --workers=16
  python prepare.py --source='books/**/*.txt' --out=DIR    # bytes tokenizer
  python prepare.py --source=tfds:lm1b --tfds_data_dir=DIR \
      --tfds_splits=train,test --out=DIR2 --tokenizer=sentencepiece --tokenizer_path=m.model

  --source is a glob of text / jsonl(.gz) / parquet files (documents in field --text_key) or
  tfds:NAME; a rerun after an interruption resumes where it stopped.

TFDS datasets as array_record, read (and tokenized) during training:

  python prepare.py --dataset=stdlib --data_dir=DIR
  python prepare.py --dataset=text_files --text_glob='books/*.txt' --data_dir=DIR
  python prepare.py --dataset=lm1b --data_dir=DIR
  python prepare.py --dataset=digits --data_dir=DIR   # embedded 8x8 images

Run from the repository root; defaults come from configs/base.py. 'stdlib' and 'text_files' are
also prepared automatically by training; any other name is a TFDS dataset, downloaded and generated
by TFDS (some TFDS datasets need TensorFlow or apache-beam to generate: then run
`tfds build NAME --data_dir=DIR --file_format=array_record` where those are installed and copy DIR).
The work is done by hyperconn_jax/data/prepare.py.
"""

import sys

from configs import base
from hyperconn_jax.data import prepare

if __name__ == '__main__':
  prepare.main(sys.argv[1:], base.get_config(), description=__doc__.split('\n\n')[0])
