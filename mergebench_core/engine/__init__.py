"""The tensor engine: where tensors come from (`sources`, `safetensors_reader`, `checkpoint_files`,
`pickle_checkpoints`, with the header checks of `safetensors_format`) and go to (`safetensors_writer`), what each
tensor is (`roles`), exact top-k (`exact_topk`, `threshold_search`), the merge stream (`stream`), the data-free method
bases and the loop that runs them (`data_free`), the task-vector pipeline (`pipeline`, its stages in
`task_vector_stages`) and batch-norm running statistics after a merge (`running_stats`).

`tensors`, `merging` and `sparsify` re-export the names plugins have always imported from them."""
