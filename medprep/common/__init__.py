"""Small helpers every wing uses: ``atomic`` (write to a temporary name, then rename),
``errors`` (``InputError``: bad input in one line), ``parallel`` (pools sized by a job's
threads), ``progress``, ``redact`` (credentials out of every text), ``settings`` (the
schemas and the typed settings built from them), ``tables`` (tile and patch tables from
numpy buffers), ``claims`` (what a file claims, checked before it is decoded),
``statuses`` (a step's or sample's status) and ``config_docs`` (the configuration page)."""
