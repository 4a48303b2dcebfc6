"""Where `mergebench merge` writes: `--out` checked before any work, and folders that do not exist yet built aside
and renamed into place only when the merge succeeds, so a refused or failed merge leaves nothing behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

from mergebench_core.errors import MergebenchError


class StagedOutput:
    """The output of one merge: a `.safetensors` file, or a folder (`folder=True`) of model files and side files.

    When every folder on the way to the output exists, files are written in place (each writer is atomic on its
    own). When some do not, the missing subtree is built inside a hidden staging folder beside the highest missing
    one and renamed onto it at `commit`: a merge that fails, is refused or is interrupted creates no folder at all.
    A missing folder above `--out` itself is created only with `parents` (`--parents`), so that a typo in a path
    does not quietly build a tree of folders up to the filesystem's root.
    """

    def __init__(self, out: str | os.PathLike[str], *, folder: bool, parents: bool = False):
        self.out = Path(os.path.abspath(out))
        if folder and self.out.exists() and not self.out.is_dir():
            raise MergebenchError(f"--out {out}: this method writes a folder, but {self.out} is a file; name a "
                                  f"folder (a new one, or one to add the merged files to)")
        if not folder and self.out.is_dir():
            raise MergebenchError(f"--out {out} is a folder; name the .safetensors file to write, or a folder "
                                  f"without the .safetensors suffix to write model.safetensors into")
        top = None  # the highest folder that must be created
        for p in ([self.out] if folder else []) + [self.out.parent, *self.out.parent.parents]:
            if p.exists():
                if not p.is_dir():
                    raise MergebenchError(f"--out {out}: {p} is a file, not a folder; choose another path")
                break
            top = p
        if top is not None and top != self.out and not parents:
            raise MergebenchError(f"--out {out}: the folder {self.out.parent} does not exist; create it first, or "
                                  f"add --parents to create it (and the missing folders above it) when the merge "
                                  f"succeeds")
        self.top = top
        self.stage = None if top is None else \
            top.with_name(f".{top.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")

    def path(self, final: str | os.PathLike[str]) -> Path:
        """Where to write what will end up at `final` (a path at or below `--out`)."""
        final = Path(os.path.abspath(final))
        if self.stage is None or self.top is None:
            return final
        return self.stage / final.relative_to(self.top)

    def __enter__(self) -> StagedOutput:
        if self.stage is not None:
            self.stage.mkdir()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.stage is None or self.top is None:
            return
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        try:
            os.rename(self.stage, self.top)
        except OSError as error:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise MergebenchError(f"cannot move the merged output into place at {self.top} ({error}); was it "
                                  f"created by something else meanwhile? Nothing was written") from error
