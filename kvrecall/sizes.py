"""PolicyConfig fields counted in tokens of the sequence, shared by the daemon (which refuses
any larger than layout.max_tokens) and the SDK (which can cap them: fit_to_sequence)."""

TOKEN_COUNT_FIELDS = ("budget", "n_sink", "window", "observation", "cluster_size", "max_segment", "window_size", "page_size")
