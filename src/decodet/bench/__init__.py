"""The benchmark suite behind ``decodet benchmark``: the rows (runtime x precision), timing and
the machine's peak (``benchmark``, ``cases``, ``rows``)."""
