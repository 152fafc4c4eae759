"""The ``serve`` command and its supervisor, which starts the device process and the front-end processes and
stops them together; also the in-process server that tests, the demo and benchmarks run.
"""
