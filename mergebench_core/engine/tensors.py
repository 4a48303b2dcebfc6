"""Named tensors, read lazily from state dicts or safetensors files, and written as they are produced.

This module is the public face plugins have always imported (`from mergebench_core.engine.tensors import
StateDictSource`); each name is defined in the module of its idea, and is re-exported here unchanged:

- `sources`: the `TensorSource` protocol and its optional features, `StateDictSource`, `check_compatible`;
- `safetensors_format`: dtype codes and the checks of an untrusted header (`read_safetensors_header`, the caps);
- `checkpoint_files`: which files make up a checkpoint, kept inside the folder named (`resolve_checkpoint_files`);
- `safetensors_reader` / `safetensors_writer`: `SafetensorsSource`, `load_state_dict`; `StreamingSafetensorsWriter`,
  `save_state_dict`;
- `pickle_checkpoints`: pickle files read safely and converted once (`read_pickle_checkpoint`);
- `tensor_math`: `check_finite`, `task_vectors`, `is_mergeable`, `polar_factor`.

Code inside mergebench imports from those modules directly.
"""

from mergebench_core.engine.checkpoint_files import (
    copy_side_files,
    input_root,
    resolve_checkpoint_files,
    resolves_inside,
)
from mergebench_core.engine.pickle_checkpoints import (
    TRUST_PICKLE_ENV,
    convert_pickle_checkpoint,
    read_pickle_checkpoint,
)
from mergebench_core.engine.safetensors_format import (
    MAX_HEADER_BYTES_ENV,
    MAX_TENSORS_ENV,
    max_header_bytes,
    max_tensors,
    read_safetensors_header,
)
from mergebench_core.engine.safetensors_reader import SafetensorsSource, load_state_dict
from mergebench_core.engine.safetensors_writer import StreamingSafetensorsWriter, save_state_dict
from mergebench_core.engine.sources import (
    StateDictSource,
    SupportsReadInto,
    SupportsReadSlices,
    TensorSource,
    check_compatible,
)
from mergebench_core.engine.tensor_math import check_finite, is_mergeable, polar_factor, task_vectors

__all__ = [
    "MAX_HEADER_BYTES_ENV", "MAX_TENSORS_ENV", "TRUST_PICKLE_ENV", "SafetensorsSource", "StateDictSource",
    "StreamingSafetensorsWriter", "SupportsReadInto", "SupportsReadSlices", "TensorSource", "check_compatible",
    "check_finite", "convert_pickle_checkpoint", "copy_side_files", "input_root", "is_mergeable", "load_state_dict",
    "max_header_bytes", "max_tensors", "polar_factor", "read_pickle_checkpoint", "read_safetensors_header",
    "resolve_checkpoint_files", "resolves_inside", "save_state_dict", "task_vectors",
]
