"""The tensor engine: tensor sources and writers (`tensors`), what each tensor is (`roles`), exact top-k
(`sparsify`), the streaming merge and the data-free method bases (`merging`), the task-vector pipeline
(`pipeline`) and batch-norm running statistics after a merge (`running_stats`)."""
