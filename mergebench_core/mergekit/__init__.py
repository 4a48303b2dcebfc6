"""MergeKit's YAML merge configs as an input format of `mergebench merge --config`.

A MergeKit user's config runs unchanged, or is refused naming the key we cannot honour; nothing is ignored.
`config` reads and checks the file, `settings` evaluates parameter values (gradients, filters) per tensor, `models`
finds the models a config names (only inside the folders it may read), `plan` lists the output tensors and where
each comes from (slices, frankenmerges), `methods` maps MergeKit's method names onto registered mergebench methods,
and `run` streams the merge into sharded safetensors with a model card.
"""
