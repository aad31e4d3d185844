"""trimkv's version and the name it is published under (``pyproject.toml`` reads ``__version__`` from here).

The import name is ``trimkv``; the distribution is ``trimkv-gates``, because ``trimkv`` on PyPI is the TRIM-KV
authors' inference package, which has the same import name: the two cannot be installed in one environment.
"""
__version__ = "0.1.0"
DISTRIBUTION = "trimkv-gates"
