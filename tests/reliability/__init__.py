"""The fault, load and hostile-input suite: short in ``make test``, full in
``make reliability`` (``BERTSTREAM_RELIABILITY=full``)."""
