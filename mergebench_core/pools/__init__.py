"""Pools: addressed by name (`views`: extended names and task subsets; `params`: pool parameters), read from disk
(`folder`: the checkpoint-pool bases and your own folder of models; `states`: pools of state dicts in memory), and
fetched from the Hugging Face hub (`hub`: the cache, offline checks, models and datasets)."""
