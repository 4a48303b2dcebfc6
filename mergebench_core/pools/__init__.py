"""Pools addressed by name: extended names and task subsets (`views`), pool parameters (`params`)."""
