"""The plugin contract: the three nouns (`api`), the hooks a plugin implements (`hookspecs`), their discovery and
lookup (`registry`), and method parameters from defaults, YAML and overrides (`config`)."""
