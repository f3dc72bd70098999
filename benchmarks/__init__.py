"""The pipelines bench.py and stepprofile.py time: the blog-style one and this project's, the models they train, and
the FLOP and memory counters (pipelines)."""
