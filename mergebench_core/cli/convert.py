"""`mergebench convert`: pickle checkpoints turned into safetensors once, so that later runs never unpickle."""

from __future__ import annotations

import argparse
from typing import Any

import mergebench_core.contract.registry as registry_module
from mergebench_core.cli.arguments import trust_pickle
from mergebench_core.errors import MergebenchError


def cmd_convert(args: argparse.Namespace) -> int:
    """Turn pickle checkpoints into safetensors once, so later runs never unpickle."""
    from mergebench_core.engine.pickle_checkpoints import convert_pickle_checkpoint

    trust = trust_pickle(args)
    if args.modelpool:
        from mergebench_core.pools.params import make_pool
        from mergebench_core.pools.views import PoolName

        parsed = PoolName.parse(args.modelpool)
        pool = make_pool(registry_module.get_registry().modelpool(parsed.base), parsed)
        convert = getattr(pool, "convert", None)
        if convert is None:
            raise MergebenchError(f"model pool {args.modelpool!r} has nothing to convert")
        pool.configure(trust_pickle=trust)
        for written in convert():
            print(f"wrote {written}")
    for path in args.paths:
        print(f"wrote {convert_pickle_checkpoint(path, trust_pickle=trust)}")
    if not args.modelpool and not args.paths:
        raise MergebenchError("name checkpoint files or --modelpool to convert")
    return 0


def add_parser(sub: Any) -> None:
    """The `convert` command and its options."""
    conv = sub.add_parser("convert", help="convert pickle checkpoints (.pt/.bin) to safetensors, once")
    conv.add_argument("paths", nargs="*", help="checkpoint files; each gets a .safetensors beside it")
    conv.add_argument("--modelpool", "-p", help="convert every checkpoint of this pool (pools that read pickles)")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="allow full unpickling (runs code from the file; only for files you trust)")
    conv.set_defaults(func=cmd_convert)
