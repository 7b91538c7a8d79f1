"""Orchestration: the ``eqntk`` command line, the Ray runner, the result store and the
pipelines that take a results directory to tables and a report.

The top layer: it imports ``study`` (what is run), ``workers`` (how a unit trains) and
``analysis`` (what it means); none of them imports it.
"""
