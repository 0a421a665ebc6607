"""`flaxformer-lite prepare` and `flaxformer-lite tokenizer train`.

Bad input (corpus, tokenizer, options, a full disk) prints one `error: ...` line naming
the file or argument and exits with status 2; nothing half-written is left for `train`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import warnings

from flaxformer_lite.errors import EXIT_BAD_INPUT
from flaxformer_lite.runtime.flags import fraction, non_negative_int, positive_int


def _part(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part {value!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--part {value}: need 0 <= I < N")
    return i, n


def _corpus_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--corpus", nargs="+", required=required, metavar="SRC",
                        help="files, folders or globs: text, .jsonl[.gz|.zst], .parquet; or 'builtin'")
    parser.add_argument("--text-field", default="text", help="JSON field / Parquet column of the text")
    parser.add_argument("--document-unit", default="paragraph", choices=("paragraph", "line", "file"),
                        help="plain text: a document is a paragraph, a line or a whole file")


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite prepare`."""
    _corpus_arguments(parser, required=False)
    parser.add_argument("--out", required=True, metavar="DATADIR", help="folder of the token store")
    parser.add_argument("--tokenizer", default="byte", help="'byte', or a tokenizer.json (or its folder)")
    parser.add_argument("--objective", default="text", choices=("text", "sft", "dpo"),
                        help="text: documents; sft, dpo: JSON lines of fine-tuning examples, rendered with the "
                             "tokenizer folder's chat template and stored with their loss masks")
    parser.add_argument("--val-fraction", type=fraction, default=0.05, help="documents held out for validation")
    parser.add_argument("--split", default="hash", choices=("hash", "tail"),
                        help="hash: by a seeded content hash; tail: the last documents")
    parser.add_argument("--seed", type=int, default=0, help="key of the hash split (data.seed)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="source files tokenized at once (default: one per CPU)")
    parser.add_argument("--shard-tokens", type=positive_int, default=1 << 27, help="tokens per shard at most")
    parser.add_argument("--part", type=_part, metavar="I/N",
                        help="prepare only sources I, I+N, ... (then run --merge once all parts are done)")
    parser.add_argument("--merge", action="store_true", help="write the manifest over the finished parts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite tokenizer train`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    about = "train a byte-level BPE (or WordPiece) tokenizer.json on a corpus, streamed"
    train = sub.add_parser("train", help=about, description=about)
    _corpus_arguments(train)
    train.add_argument("--vocab-size", type=positive_int, required=True, help="total ids, sentinels included")
    train.add_argument("--out", required=True, help="tokenizer.json path, or a folder to hold one")
    train.add_argument("--num-sentinels", type=non_negative_int, default=100, help="T5 <extra_id_N> tokens (span corruption)")
    train.add_argument("--kind", default="bpe", choices=("bpe", "wordpiece"), help="byte-level BPE or WordPiece")


def _corpus(values: list[str]):
    return values[0] if len(values) == 1 else values


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare (or merge) a token store; print its manifest's totals."""
    from flaxformer_lite.data import DataError, PrepareOptions, merge, prepare, store

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.merge:
                manifest = merge(args.out)
            else:
                if not args.corpus:
                    raise DataError("--corpus is required (except with --merge)")
                options = PrepareOptions(
                    tokenizer=args.tokenizer, text_field=args.text_field, document_unit=args.document_unit,
                    val_fraction=args.val_fraction, split=args.split, seed=args.seed, shard_tokens=args.shard_tokens,
                    objective=args.objective,
                )
                out = prepare(_corpus(args.corpus), args.out, options, workers=args.workers, part=args.part,
                              progress=not args.no_progress)
                if args.part is not None:
                    i, n = args.part
                    print(f"part {i}/{n} done in {out}; once all {n} parts are, run: flaxformer-lite prepare "
                          f"--merge --out {out}")
                    return 0
                manifest = store.read_json(out / store.MANIFEST, "manifest")
    except (DataError, FileNotFoundError) as e:
        return _fail(e)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    totals = {k: manifest[k] for k in ("documents", "tokens", "vocab_size", "dtype", "replaced_utf8_sequences")}
    totals["shards"] = len(manifest["shards"])
    totals["val_documents"] = manifest["split"]["val_documents"]
    print(json.dumps(totals, indent=2))
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    """Train a tokenizer on the streamed corpus and save it."""
    from flaxformer_lite.data import DataError, iter_texts, train_tokenizer

    try:
        texts = iter_texts(_corpus(args.corpus), text_field=args.text_field, unit=args.document_unit, errors="replace")
        first = next(texts, None)
        if first is None:
            raise DataError(f"{' '.join(args.corpus)}: no text found; the corpus is empty")
        tok = train_tokenizer(itertools.chain([first], texts), kind=args.kind, vocab_size=args.vocab_size, out_path=args.out,
                              num_sentinels=args.num_sentinels)
    except (DataError, FileNotFoundError) as e:
        return _fail(e)
    print(json.dumps({"tokenizer": tok.name, "vocab_size": tok.vocab_size}))
    return 0

